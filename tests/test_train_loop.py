"""End to end through train.main: DocVQA-schema parquet with bad records, kill -9 and resume, CLI errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from train.main import main

ROOT = Path(__file__).resolve().parent.parent

# A small, fast variant of the CPU demo: 64x64 images, 32 records, batch 8.
SMALL = [
    "--config.data.synthetic.num_train=48", "--config.data.synthetic.num_val=10",
    "--config.data.synthetic.image_size=64", "--config.data.image_size=64", "--config.batch_size=8",
    "--config.eval.batch_size=8", "--config.max_steps=6", "--config.log_every_steps=1",
    "--config.eval_at_start=false", "--config.eval.max_new_tokens=4",
]


def _run_main(workdir, extra=()):
    assert main(["--config", "cpu_demo.py", "--workdir", str(workdir), *SMALL, *extra]) == 0


def _losses(workdir):
    rows = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_parquet_with_bad_records_trains_and_counts_skips(tmp_path):
    from train.data import synthetic

    paths = synthetic.generate(tmp_path / "data", 40, 10, image_size=64, seed=3,
                               bad=synthetic.BadRecords(corrupt_image=2, missing_image=1, empty_answers=2,
                                                        grayscale=1, rgba=1, cmyk=1, palette=1,
                                                        long_question=1, long_answer=1))
    wd = tmp_path / "run"
    _run_main(wd, [f"--config.data.source={paths['train']}", f"--config.data.eval_source={paths['validation']}",
                   "--config.max_steps=5"])  # 5 batches of 8 pass the 35 good records: every bad one is read
    summary = json.loads((wd / "summary.json").read_text())
    # The best checkpoint is one that exists (the evaluation before training has none).
    assert summary["best"]["step"] > 0 and (wd / "checkpoints" / str(summary["best"]["step"])).is_dir()
    counters = summary["data_counters"]
    assert counters["skipped"] >= 5  # 2 corrupt + 1 missing + 2 empty answers, each counted
    assert counters["examples"] == 5 * 8  # the rows the steps took, not the batches the prefetcher read ahead
    assert counters.get("skipped_empty_answers", 0) >= 1 and counters.get("skipped_bad_image", 0) >= 1
    # Skipped records do not change batch shapes: the step compiled at most once (zero on a cache hit).
    assert summary["train_step_recompiles"] == 0 and summary["train_step_compiles"] <= 1
    assert 0.0 <= summary["data_busy"] <= 1.0
    logged = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= m["data_busy"] <= 1.0 for m in logged if "data_busy" in m) and "data_busy" in logged[-1]
    evals = [json.loads(x) for x in (wd / "eval.jsonl").read_text().splitlines()]
    assert evals[-1]["num_examples"] == 10 and {"step", "epoch", "val_loss", "anls"} <= set(evals[-1])
    # The export loads in transformers.
    from transformers import Florence2ForConditionalGeneration as HF

    _, info = HF.from_pretrained(wd / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (wd / "training_curves.png").exists() and list((wd / "tensorboard").iterdir())


def test_kill_and_resume_equals_uninterrupted(tmp_path, capsys):
    cache = tmp_path / "jax_cache"
    extra = [f"--config.compilation_cache_dir={cache}", "--config.checkpoint_every_steps=2"]
    ref = tmp_path / "ref"
    _run_main(ref, extra)

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "train.main", "--config", "cpu_demo.py", "--workdir", str(killed), *SMALL, *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = killed / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in ckpts.glob("*") if p.name.isdigit() and int(p.name) >= 2] if ckpts.exists() else []
        if done:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "export").exists()
    _run_main(killed, extra)  # the same command resumes

    # The resumed launch redid the steps the killed one logged past its checkpoint: each step is logged once.
    steps = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), steps
    a, b = _losses(ref), _losses(killed)
    for step in range(3, 7):  # steps after the resume point saw the same batches
        assert a[step] == pytest.approx(b[step], abs=1e-6), step
    pa, pb = load_file(str(ref / "export/model.safetensors")), load_file(str(killed / "export/model.safetensors"))
    for k in pa:
        np.testing.assert_allclose(pb[k], pa[k], atol=1e-6, err_msg=k)

    # Resuming with settings that change the run is refused with the list of changes; allowed on request,
    # keeping the previous config.
    capsys_free = main(["--config", "cpu_demo.py", "--workdir", str(ref), *SMALL, *extra,
                        "--config.optim.learning_rate=0.5", "--config.log_every_steps=3"])
    assert capsys_free == 2
    assert main(["--config", "cpu_demo.py", "--workdir", str(ref), *SMALL, *extra,
                 "--config.optim.learning_rate=0.5", "--allow_config_change"]) == 0
    assert len(list(ref.glob("config.previous-*.json"))) == 1
    assert json.loads((ref / "config.json").read_text())["optim"]["learning_rate"] == 0.5

    # Training records edited between launches (the same settings): the data order and the saved position are
    # the old records', so the resume is refused naming the change; allowed on request.
    import pyarrow.parquet as pq

    table = pq.read_table(ref / "data" / "train.parquet")
    pq.write_table(table.slice(0, table.num_rows - 8), ref / "data" / "train.parquet")
    same = ["--config", "cpu_demo.py", "--workdir", str(ref), *SMALL, *extra, "--config.optim.learning_rate=0.5"]
    capsys.readouterr()
    assert main(same) == 2
    assert "error: the training data changed since the checkpoint of step 6 (48 training records, now 40)" in (
        capsys.readouterr().err)
    assert main([*same, "--allow_config_change"]) == 0
    assert "Resuming on changed training data (--allow_config_change): 48 training records, now 40" in (
        capsys.readouterr().out)

    # scripts.export rebuilds the same model from the run's last checkpoint.
    from scripts.export import main as export_main

    assert export_main(["--workdir", str(ref), "--out", str(tmp_path / "exported")]) == 0
    pe = load_file(str(tmp_path / "exported/model.safetensors"))
    assert set(pe) == set(pa) and all(np.array_equal(pe[k], pa[k]) for k in pa)
    assert (tmp_path / "exported/tokenizer.json").exists()


def test_sigterm_saves_at_the_next_step_exits_0_and_resumes(tmp_path):
    """Preemption: SIGTERM mid-run -> a checkpoint at the step being trained, exit status 0, no export;
    the same command resumes and ends bit-for-bit where an uninterrupted run ends (<= 1e-6: same batches,
    same devices, same compiled programs)."""
    extra = [f"--config.compilation_cache_dir={tmp_path / 'jax_cache'}", "--config.checkpoint_every_steps=2",
             "--config.max_steps=8", "--config.eval.enabled=false"]
    ref = tmp_path / "ref"
    _run_main(ref, extra)

    run = tmp_path / "preempted"
    cmd = [sys.executable, "-m", "train.main", "--config", "cpu_demo.py", "--workdir", str(run), *SMALL, *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = tmp_path / "preempted.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        ckpts = run / "checkpoints"
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if ckpts.exists() and any(p.name.isdigit() and int(p.name) >= 2 for p in ckpts.iterdir()):
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before SIGTERM\n{log.read_text()[-2000:]}"
        proc.send_signal(signal.SIGTERM)
        t0 = time.time()
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, log.read_text()[-3000:]
    print(f"exited {time.time() - t0:.1f}s after SIGTERM")
    summary = json.loads((run / "summary.json").read_text())
    saved = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    logged = max(_losses(run))
    # Stopped at the boundary of the step it was in: that step was saved (the signal came after the
    # step-2 checkpoint, so it is a later one), and nothing was trained after it.
    assert summary["preempted"] and summary["step"] == saved == logged and 2 < saved < 8, (summary, saved, logged)
    assert "SIGTERM received: checkpoint saved at step" in log.read_text()
    assert not (run / "export").exists()

    _run_main(run, extra)  # the same command resumes
    a, b = _losses(ref), _losses(run)
    assert sorted(b) == list(range(1, 9))
    for step in range(saved + 1, 9):
        assert a[step] == pytest.approx(b[step], abs=1e-6), step
    pa, pb = load_file(str(ref / "export/model.safetensors")), load_file(str(run / "export/model.safetensors"))
    for k in pa:
        np.testing.assert_allclose(pb[k], pa[k], atol=1e-6, rtol=0, err_msg=k)
    assert not json.loads((run / "summary.json").read_text())["preempted"]


class _Source:
    """An iterator with grain's state methods, each item taking ``delay`` seconds."""

    def __init__(self, n: int, delay: float):
        self.i, self.n, self.delay = 0, n, delay

    def __next__(self):
        if self.i == self.n:
            raise StopIteration
        time.sleep(self.delay)
        self.i += 1
        return self.i

    def get_state(self):
        return {"i": self.i}


@pytest.mark.parametrize("read_s, step_s, bound", [(0.03, 0.0, True), (0.0, 0.03, False)])
def test_prefetcher_says_whether_the_step_waits_for_data(read_s, step_s, bound):
    from train.loop import Prefetcher
    from train.reporting import DATA_BOUND, data_busy

    prefetch = Prefetcher(_Source(12, read_s), lambda b: b)
    start = prefetch.busy()
    got = []
    for _ in range(12):
        batch, state = next(prefetch)
        got.append((batch, state["i"]))
        time.sleep(step_s)  # the step
    assert got == [(i, i) for i in range(1, 13)]  # in order, each with the state right after it
    frac = data_busy(start, prefetch.busy())
    # A slow source keeps the thread busy (the loop waits); a slow step leaves it waiting on a full queue.
    assert (frac > DATA_BOUND) if bound else (frac < 0.5), frac


def test_unknown_field_and_bad_value_fail_before_compiling(capsys):
    assert main(["--config", "cpu_demo.py", "--config.optim.learnin_rate=1"]) == 2
    assert "learnin_rate" in capsys.readouterr().err
    assert main(["--config", "cpu_demo.py", "--config.batch_size=many"]) == 2
    assert "expected an integer" in capsys.readouterr().err
    assert main(["--config", "no_such_config.py"]) == 2
    assert "cpu_demo.py" in capsys.readouterr().err  # lists the known configs
