"""Command-line overrides are read as a user means them; freeze patterns that match nothing stop the run."""

from __future__ import annotations

import json
import re

import pytest

from train.config import ConfigError, load_config, parse_value


@pytest.mark.parametrize(("raw", "want"), [
    ('("nomatch_xyz",)', ("nomatch_xyz",)),  # a one-item tuple: one pattern, not an empty one
    ("('a', 'b')", ("a", "b")),
    ('["a"]', ("a",)),
    (r'(r"^model\.(vision_tower|x)",)', (r"^model\.(vision_tower|x)",)),  # parentheses inside a regex survive
    ('("a{1,2}b",)', ("a{1,2}b",)),  # so do commas
    ("question=query,answers=label", ("question=query", "answers=label")),  # bare comma-separated items
    ("^model\\.vision_tower\\.", ("^model\\.vision_tower\\.",)),
    ("()", ()),
    ("", ()),
])
def test_tuple_overrides(raw, want):
    assert parse_value(raw, tuple[str, ...], "x") == want


def test_scalar_overrides():
    assert parse_value('"refs/pr/6"', str | None, "x") == "refs/pr/6"  # quotes are not kept
    assert parse_value("'a b'", str, "x") == "a b"
    assert parse_value("plain", str, "x") == "plain"
    assert parse_value("None", str | None, "x") is None
    assert parse_value("1e-3", float, "x") == 1e-3
    assert parse_value("1_000", int, "x") == 1000
    assert parse_value("True", bool, "x") is True
    for raw, hint in (("('a', 3)", tuple[str, ...]), ("(1", tuple[str, ...]), ("1.5", int), ("maybe", bool)):
        with pytest.raises(ValueError, match="bad value"):
            parse_value(raw, hint, "x")


def test_the_column_syntax_an_error_suggests_is_accepted():
    from train.data.templates import ConfiguredTemplate

    template = ConfiguredTemplate("docvqa")
    with pytest.raises(ValueError) as err:
        template.check_columns(type("Src", (), {"column_names": ["query", "image", "answers"]})(), "config.data")
    suggested = re.search(r"columns=(\(.*?,\))", str(err.value)).group(1)  # ("question=YOUR_COLUMN",)
    cfg = load_config("gpu_a100.py", [f"data.columns={suggested.replace('YOUR_COLUMN', 'query')}"])
    assert cfg.data.mixture[0].columns == ("question=query",)


def test_bad_and_empty_regexes_fail_at_config_time():
    with pytest.raises(ValueError, match="bad regex"):
        load_config("gpu_a100.py", ['optim.freeze=("^model\\.(vision",)'])
    with pytest.raises(ValueError, match="empty pattern matches every path"):
        load_config("gpu_a100.py", ['optim.freeze=("",)'])


def _tiny_params():
    from flax import nnx

    from florence_jax import Florence2ForConditionalGeneration
    from train.state import tiny_config

    model = Florence2ForConditionalGeneration(tiny_config(128, 127), rngs=nnx.Rngs(0))
    return nnx.state(model, nnx.Param)


def test_a_freeze_pattern_that_matches_nothing_stops_the_run_and_names_the_nearest_paths():
    from train.config import OptimConfig
    from train.optim import FREEZE_TOWER, make_optimizer

    params = _tiny_params()
    with pytest.raises(ConfigError, match=r"'\^model\\\\.vision_towr\\\\.' matches no parameter path") as err:
        make_optimizer(OptimConfig(freeze=(r"^model\.vision_towr\.",)), params, 10)
    assert "model.vision_tower" in str(err.value)
    # The override the message suggests is valid and freezes the tower.
    suggested = parse_value(FREEZE_TOWER, tuple[str, ...], "optim.freeze")
    assert f"--config.optim.freeze='{FREEZE_TOWER}'" in str(err.value)
    _, labels, _ = make_optimizer(OptimConfig(freeze=suggested), params, 10)
    from train.optim import count_params

    counts = count_params(params, labels)
    assert counts["frozen"] > 0 and counts["trainable"] > 0
    with pytest.raises(ConfigError, match="freezes every parameter"):
        make_optimizer(OptimConfig(freeze=(r"^model\.",)), params, 10)


SMALL_DEMO = ["--config.data.synthetic.num_train=48", "--config.data.synthetic.num_val=8", "--config.batch_size=8"]


@pytest.mark.parametrize(("overrides", "needle"), [
    # The suite runs on 8 simulated devices: a batch of 12 does not divide over them.
    (["--config.batch_size=12"], "multiple of the 8 devices"),
    (["--config.data.source=/no/such/file.parquet"], "/no/such/file.parquet"),
    (["--config.data.image_size=128", "--config.data.synthetic.image_size=128"], "--config.data.image_size=64"),
    (["--config.lora.enabled=true", r"--config.lora.targets=('q_projj$',)"], "matches no linear layer"),
    (["--config.optim.freeze=('^model\\.vision_towr',)"], "matches no parameter path"),
    # Each was a traceback (or, for the optimizer's, a run that silently did something else).
    (["--config.optim.warmup_steps=-5"], "config.optim.warmup_steps must be >= 0"),
    (["--config.optim.max_grad_norm=-1"], "config.optim.max_grad_norm must be >= 0, got -1.0 (0: no clipping)"),
    (["--config.optim.b2=1.0"], "config.optim.b2 must be in [0, 1)"),
    (["--config.data.max_prompt_tokens=1"], "config.data.max_prompt_tokens must be at least 2"),
    (["--config.data.synthetic.num_train=4"], "4 training records give no full batch of 8"),
    (["--config.data.columns=question=qry"], "column 'qry' (mapped to the 'docvqa' template's 'question'"),
])
def test_start_up_errors_are_one_line_with_exit_2(tmp_path, capsys, overrides, needle):
    from train.main import main

    assert main(["--config", "cpu_demo.py", "--workdir", str(tmp_path / "run"), *SMALL_DEMO, *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1] and not any("Traceback" in line for line in err)


def test_an_unwritable_workdir_is_one_error_line(tmp_path, capsys):
    from train.main import main

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["--config", "cpu_demo.py", "--workdir", str(blocker / "run"), *SMALL_DEMO]) == 2
    assert "cannot write to the workdir" in capsys.readouterr().err


def test_a_bad_batch_is_refused_before_any_data_is_made(tmp_path):
    from train.main import main

    assert main(["--config", "cpu_demo.py", "--workdir", str(tmp_path), *SMALL_DEMO, "--config.batch_size=12"]) == 2
    assert not (tmp_path / "data").exists()


def test_every_config_round_trips_through_its_saved_json():
    """scripts.export rebuilds a run's config from its config.json: tuples, regexes and mixtures included."""
    import json

    from scripts.export import _config_from_json
    from train.config import CONFIG_DIR, TrainConfig, apply_override

    for path in sorted(CONFIG_DIR.glob("*.py")):
        if path.name.startswith("_"):
            continue
        cfg = load_config(path.name)
        again = _config_from_json(json.loads(cfg.to_json()), TrainConfig, apply_override)
        assert again.to_dict() == cfg.to_dict(), path.name


def test_a_resume_lists_the_settings_that_change_the_run():
    from train.loop import config_changes

    before = load_config("gpu_a100.py").to_dict()
    after = load_config("gpu_a100.py", ["optim.learning_rate=1e-5", "log_every_steps=3", "batch_size=16",
                                        "eval.num_beams=1", "data.num_workers=2"]).to_dict()
    assert config_changes(before, after) == ["batch_size: 32 -> 16", "optim.learning_rate: 1e-06 -> 1e-05"]
    assert config_changes(before, before) == []
    # As saved in the workdir (JSON), a config is unchanged; a dataset's setting is named by its position.
    saved = json.loads(json.dumps(before))
    assert config_changes(saved, before) == []
    other = load_config("gpu_a100.py", ["data.source=x.parquet", "data.max_eval_examples=5",
                                        "data.mixture.0.max_eval_examples=5"]).to_dict()
    assert config_changes(saved, other) == ["data.mixture.0.source: 'HuggingFaceM4/DocumentVQA' -> 'x.parquet'"]


def test_a_step_that_would_exhaust_host_memory_is_refused_before_it_runs():
    import jax
    import jax.numpy as jnp

    from train.loop import check_host_memory

    compiled = jax.jit(lambda x: jnp.tanh(x @ x.T) @ x).lower(jnp.ones((512, 256))).compile()
    need = check_host_memory(compiled, devices=2, available=2**40)
    assert need >= 2 * 512 * 512 * 4  # at least the (512, 512) temporary, on each of the 2 devices
    with pytest.raises(ConfigError, match=r"needs .* GiB .* is available: lower batch_size"):
        check_host_memory(compiled, devices=2, available=need // 2)


def test_a_schedule_that_does_not_do_what_it_says_is_noted():
    from train.loop import schedule_notes

    cfg = load_config("cpu_demo.py", ["max_steps=20", "num_epochs=1"])
    notes = schedule_notes(cfg, steps_per_epoch=6, total_steps=20)
    assert notes == ["max_steps=20 sets the length (3.33 epochs), not num_epochs=1",
                     "optim.warmup_steps=30 is not below the run's 20 steps: the learning rate rises for the whole "
                     "run and never decays"]
    assert schedule_notes(load_config("cpu_demo.py"), steps_per_epoch=125, total_steps=375) == []


def test_the_override_syntax_error_messages_suggest_works():
    """Every `--config.FIELD=VALUE` an error message suggests is accepted as written (shell quotes removed)."""
    import shlex
    from types import SimpleNamespace

    import jax.numpy as jnp

    from florence_jax.tiny_processor import build_tiny_processor
    from train.config import OptimConfig, apply_override
    from train.data.pipeline import ExampleEncoder, PipelineConfig
    from train.optim import make_optimizer
    from train.setup import check_export

    messages = []
    with pytest.raises(ConfigError) as err:
        make_optimizer(OptimConfig(freeze=("^nomatch",)), _tiny_params(), 10)
    messages.append(str(err.value))
    with pytest.raises(ConfigError) as err:
        ExampleEncoder([], build_tiny_processor(image_size=64), PipelineConfig(image_size=128))
    messages.append(str(err.value))
    biased = SimpleNamespace(final_logits_bias=SimpleNamespace(get_value=lambda: jnp.ones((1, 4))))
    with pytest.raises(ConfigError) as err:
        check_export(load_config("gpu_a100.py"), biased)
    messages.append(str(err.value))
    suggested = [m for message in messages for m in re.findall(r"--config\.\S+=(?:'[^']*'|\S+)", message)]
    assert len(suggested) == 3, messages
    for option in suggested:
        (word,) = shlex.split(option)  # as the shell passes it
        cfg = load_config("gpu_a100.py")
        apply_override(cfg, word[len("--config."):])
