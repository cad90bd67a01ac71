"""Data formats (JSONL prefix/suffix, The Cauldron, mapped columns), split slices, task mixtures, the metric
registry, and one training run on a mixture of every format."""

import dataclasses
import io
import json
import textwrap

import numpy as np
import pytest
from PIL import Image

from train.config import (
    ConfigError,
    DataConfig,
    MixtureComponent,
    TrainConfig,
    apply_override,
    load_config,
    validate,
)
from train.data.pipeline import DataPipeline, PipelineConfig, mixture_train
from train.data.sources import SourceError, SourceSpec, open_source, slice_bounds
from train.data.templates import BadRecordError, ConfiguredTemplate, ExpandedRecords
from train.evaluate import EvalResult, MixtureEvaluator
from train.metrics import METRICS, corpus_cer, get_metric, mean_exact_match, register_metric, relaxed_accuracy

CFG = PipelineConfig(batch_size=4, max_prompt_tokens=32, max_target_tokens=8, read_threads=1, seed=0)
COLOURS = ["red", "blue", "green", "white", "black", "yellow", "gray", "purple"]


@pytest.fixture(scope="module")
def processor():
    from florence_jax.tiny_processor import build_tiny_processor

    return build_tiny_processor(image_size=64)


def _png(colour: str, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "PNG")
    return buf.getvalue()


def write_jsonl(root, n: int, name: str = "data.jsonl"):
    """prefix/suffix lines with image paths relative to the JSONL file (in a subfolder)."""
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        colour = COLOURS[i % len(COLOURS)]
        Image.new("RGB", (20, 12), colour).save(root / "imgs" / f"{i}.png")
        lines.append(json.dumps({"image": f"imgs/{i}.png", "prefix": "<CAPTION>", "suffix": f"a {colour} page"}))
    path = root / name
    path.write_text("\n".join(lines) + "\n")
    return path


CAULDRON_ROWS = [  # (number of images, turns)
    (1, [("What colour is it?\nAnswer briefly.", "red"), ("Is it a page?", "yes")]),
    (1, [("How many bars?", "3")]),
    (1, []),  # no turn: gives no example
    (2, [("Which image is darker?", "the second")]),  # two images: skipped
    (1, [("What is the total?", "12"), ("Which year?", "2019"), ("Who signed?", "Ann")]),
    (1, [("Title?", "report")]),
]


def write_cauldron(path, rows=CAULDRON_ROWS):
    """A parquet file in The Cauldron's schema: images (list of Image), texts (list of user/assistant/source)."""
    import datasets

    features = datasets.Features({
        "images": datasets.List(datasets.Image()),
        "texts": datasets.List({"user": datasets.Value("string"), "assistant": datasets.Value("string"),
                                "source": datasets.Value("string")}),
    })
    data = {
        "images": [[{"bytes": _png(COLOURS[(i + j) % 8]), "path": None} for j in range(k)]
                   for i, (k, _) in enumerate(rows)],
        "texts": [[{"user": u, "assistant": a, "source": "test"} for u, a in turns] for _, turns in rows],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(path))
    return path


def write_mapped(path, n: int):
    """A save_to_disk folder with its own column names (query, label, img) and a DatasetDict of two splits."""
    import datasets

    features = datasets.Features({"query": datasets.Value("string"), "label": datasets.List(datasets.Value("string")),
                                  "img": datasets.Image()})
    def split(offset):
        return datasets.Dataset.from_dict({
            "query": [f"colour {i}?" for i in range(offset, offset + n)],
            "label": [[COLOURS[i % 8], COLOURS[i % 8].upper()] for i in range(offset, offset + n)],
            "img": [{"bytes": _png(COLOURS[i % 8]), "path": None} for i in range(offset, offset + n)],
        }, features=features)

    datasets.DatasetDict({"train": split(0), "validation": split(100)}).save_to_disk(str(path))
    return path


# ------------------------------------------------------------------------------------------------ metrics


def test_metric_registry_hand_computed():
    assert {"anls", "exact_match", "relaxed_accuracy", "cer"} <= set(METRICS)
    preds, refs = ["Paris", "1,234", "cat"], [["paris"], ["1,235"], ["dog", "cat "]]
    # ANLS: 1 + (1 - 1/5) + 1 (second reference matches after normalization) over 3.
    assert METRICS["anls"](preds, refs) == pytest.approx((1 + 0.8 + 1) / 3)
    # Exact match: "1,234" != "1,235".
    assert mean_exact_match(preds, refs) == pytest.approx(2 / 3)
    assert METRICS["exact_match"]([], []) == 0.0
    # Corpus CER: kitten/sitting (3 edits, 7 chars) + abc/abd (1 edit, 3 chars) = 4 / 10; the closest reference
    # counts ("ab" is 1 edit from "abd" but "abc" is 0 edits from "abc").
    assert corpus_cer(["kitten", "abc"], [["sitting"], ["abd"]]) == pytest.approx(4 / 10)
    assert corpus_cer(["kitten", "abc"], [["sitting"], ["abd", "abc"]]) == pytest.approx(3 / 10)
    assert corpus_cer(["ab"], [[]]) == 2.0  # no reference: every predicted character is an error
    # Relaxed accuracy: within 5% of a number, otherwise exact (normalized).
    assert relaxed_accuracy("104", ["100"]) == 1.0 and relaxed_accuracy("106", ["100"]) == 0.0
    assert relaxed_accuracy("1,020", ["1000"]) == 1.0 and relaxed_accuracy("12%", ["12"]) == 1.0
    assert relaxed_accuracy("0", ["0"]) == 1.0 and relaxed_accuracy("Yes", ["yes"]) == 1.0
    assert METRICS["relaxed_accuracy"](["104", "no"], [["100"], ["yes"]]) == 0.5
    # Orientation for checkpoint selection: CER is lower-is-better.
    assert METRICS["cer"].score(0.25) == -0.25 and METRICS["anls"].score(0.25) == 0.25
    # The configured ANLS threshold applies: 2 edits / 4 chars = 0.5 passes 0.5, not 0.6.
    assert get_metric("anls")(["abcd"], [["abxy"]]) == 0.5
    assert get_metric("anls", anls_threshold=0.6)(["abcd"], [["abxy"]]) == 0.0
    with pytest.raises(KeyError, match="registered"):
        get_metric("bleu")
    with pytest.raises(ValueError, match="predictions"):
        METRICS["exact_match"](["a"], [])
    # Extending: a name and a function (predictions, references) -> float.
    metric = register_metric("test_length", lambda p, r: float(sum(map(len, p))))
    try:
        assert get_metric("test_length")(["ab", "c"], [[], []]) == 3.0 and metric.higher_is_better
    finally:
        METRICS.pop("test_length")


# ------------------------------------------------------------------------------------------------ formats


def test_split_slices_on_every_local_kind(tmp_path):
    jsonl = write_jsonl(tmp_path / "j", 10)
    parquet = write_cauldron(tmp_path / "c" / "train.parquet")
    disk = write_mapped(tmp_path / "d", 10)
    assert slice_bounds("train", 10) == (0, 10) and slice_bounds("train[:-3]", 10) == (0, 7)
    assert slice_bounds("train[-3:]", 10) == (7, 10) and slice_bounds("validation[20%:50%]", 10) == (2, 5)
    for path, n in ((jsonl, 10), (parquet, len(CAULDRON_ROWS)), (disk, 10)):
        head = open_source(SourceSpec(str(path), split="train[:-2]"))
        tail = open_source(SourceSpec(str(path), split="train[-2:]"))
        assert (len(head), len(tail)) == (n - 2, 2), path
    # The slice selects the right records (JSONL: the last two lines).
    assert open_source(SourceSpec(str(jsonl), split="train[-2:]"))[0]["image"].endswith("imgs/8.png")
    assert open_source(SourceSpec(str(disk), split="validation[:1]"))[0]["query"] == "colour 100?"
    with pytest.raises(SourceError, match="train\\[x"):
        open_source(SourceSpec(str(jsonl), split="train[x:]"))


def test_a_source_of_one_split_is_not_its_own_validation_split(tmp_path):
    """A JSONL file, a COCO JSON or a parquet file holds one split ("train"): a run's validation from it must be a
    slice or another source, never, silently, its training records. A folder whose files name their splits, as a
    Hub repository's do, is read split by split."""
    import pickle

    from train.data.synthetic_detection import make_split
    from train.setup import get_datasets

    jsonl = write_jsonl(tmp_path / "j", 10)
    coco = make_split(tmp_path / "coco", "train", 5)
    for path, n in ((jsonl, 10), (coco, 5)):
        with pytest.raises(SourceError, match="holds one split, 'train', and no 'validation' split"):
            open_source(SourceSpec(str(path), split="validation", split_must_exist=True))
        assert len(open_source(SourceSpec(str(path), split="validation"))) == n  # a file given as the split
    # COCO slices as the other kinds do, and a slice pickles (grain workers read it).
    tail = open_source(SourceSpec(str(coco), split="train[-2:]", split_must_exist=True))
    assert [r["image_id"] for r in pickle.loads(pickle.dumps(tail))] == [4, 5] and len(tail.categories) > 0

    hub_layout = tmp_path / "snapshot"
    write_cauldron(hub_layout / "data" / "train-00000-of-00001.parquet")
    write_cauldron(hub_layout / "data" / "validation-00000-of-00001.parquet", CAULDRON_ROWS[:1])
    train = open_source(SourceSpec(str(hub_layout), split="train", split_must_exist=True))
    val = open_source(SourceSpec(str(hub_layout), split="validation", split_must_exist=True))
    assert (len(train), len(val)) == (len(CAULDRON_ROWS), 1)  # before: both read every file
    with pytest.raises(SourceError, match=r"no split 'test' \(its files give \['train', 'validation'\]\)"):
        open_source(SourceSpec(str(hub_layout), split="test"))

    # A run: the default eval_split ("validation") of a JSONL source is refused with what to set instead.
    overrides = [f"data.source={jsonl}", "data.template=prefix_suffix"]
    with pytest.raises(ConfigError, match="config.data.eval_split='validation'.*config.data.eval_source"):
        get_datasets(load_config("cpu_demo.py", overrides), tmp_path / "run")
    (held,) = get_datasets(load_config("cpu_demo.py", [*overrides, "data.train_split=train[:-3]",
                                                       "data.eval_split=train[-3:]"]), tmp_path / "run")
    assert (len(held.train), len(held.val)) == (7, 3)


def test_cauldron_schema_every_turn_is_an_example(tmp_path, processor):
    src = open_source(str(write_cauldron(tmp_path / "cauldron" / "train.parquet")))
    row = src[0]
    # Images in a list stay undecoded ({"bytes", "path"}), as top-level image columns do.
    assert isinstance(row["images"][0], dict) and row["images"][0]["bytes"][:4] == b"\x89PNG"
    template = ConfiguredTemplate("cauldron")
    template.check_columns(src, "test")
    turns = template.prepare(src)
    assert isinstance(turns, ExpandedRecords) and turns.empty_rows == 1
    assert len(turns) == sum(len(t) for _, t in CAULDRON_ROWS) == 8
    examples = []
    for i in range(len(turns)):
        try:
            examples.append(template(turns[i]))
        except BadRecordError as e:
            assert e.reason == "multiple_images" and i == 3
    got = [(e.prompt, e.target, e.references) for e in examples]
    assert got == [(u, a, (a,)) for k, turns_ in CAULDRON_ROWS if k == 1 for u, a in turns_]
    # Row 4's second turn: its own question, the row's image.
    assert turns[5]["_turn"] == 1 and examples[4].prompt == "Which year?"
    # The first-turn variant: one example per row.
    first = ConfiguredTemplate("cauldron_first")
    assert first.prepare(src) is src and first(src[4]).target == "12"
    # Through the pipeline: every usable turn once in evaluation, the two-image row counted as skipped.
    pipe = DataPipeline(turns, processor, dataclasses.replace(CFG, template=template, shuffle=False))
    batches = list(iter(pipe.eval(0, 1)))
    seen = np.concatenate([b["index"][b["example_mask"] == 1] for b in batches])
    assert sorted(seen.tolist()) == [0, 1, 2, 4, 5, 6, 7]
    assert pipe.references([5]) == [("2019",)]


def test_mapped_columns_and_clear_errors_for_missing_ones(tmp_path, processor):
    disk = str(write_mapped(tmp_path / "mapped", 6))
    src = open_source(disk)
    mapped = ConfiguredTemplate("mapped", ("prompt=query", "target=label", "image=img"), "<VQA>")
    mapped.check_columns(src, "config.data")
    ex = mapped(src[1])
    assert (ex.prompt, ex.target, ex.references) == ("<VQA>colour 1?", "blue", ("blue", "BLUE"))
    # The same data through the docvqa template with renames.
    docvqa = ConfiguredTemplate("docvqa", ("question=query", "answers=label", "image=img"))
    assert docvqa(src[2]).prompt == "<DocVQA>colour 2?" and docvqa(src[2]).references == ("green", "GREEN")
    batch = next(iter(DataPipeline(src, processor, dataclasses.replace(CFG, template=mapped)).train(0, 1)))
    assert batch["pixel_values"].shape == (4, 64, 64, 3)
    # A mapped column that does not exist: named at start, with the columns that do.
    with pytest.raises(ValueError, match=r"config.data.mixture\[x\]: column 'question'.*columns: \['img', 'label'"):
        ConfiguredTemplate("mapped", ("prompt=question", "target=label", "image=img")).check_columns(
            src, "config.data.mixture[x]")
    # A field the template reads but no rename provides.
    with pytest.raises(ValueError, match="reads 'question'.*question=YOUR_COLUMN"):
        ConfiguredTemplate("docvqa", ("answers=label", "image=img")).check_columns(src, "config.data")
    # Renames of fields the template does not read, and malformed entries.
    with pytest.raises(ValueError, match="reads"):
        ConfiguredTemplate("docvqa", ("prompt=query",))
    with pytest.raises(ValueError, match="FIELD=DATASET_COLUMN"):
        ConfiguredTemplate("mapped", ("query",))
    # JSONL: relative images resolve in the renamed image column; its columns are the lines' keys.
    root = tmp_path / "j"
    (root / "p").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "p" / "a.png")
    (root / "x.jsonl").write_text(json.dumps({"picture": "p/a.png", "q": "hi", "a": "yo"}) + "\n")
    jsrc = open_source(SourceSpec(str(root / "x.jsonl"), image_column="picture"))
    assert jsrc.column_names == ["a", "picture", "q"] and jsrc[0]["picture"] == str(root / "p" / "a.png")


def _pipelines(tmp_path, processor, bad_jsonl: bool = False):
    jsonl = write_jsonl(tmp_path / "j", 12)
    if bad_jsonl:
        for p in (tmp_path / "j" / "imgs").iterdir():
            p.write_bytes(b"not a png")
    cauldron = ConfiguredTemplate("cauldron")
    mapped = ConfiguredTemplate("mapped", ("prompt=query", "target=label", "image=img"))
    srcs = [
        (open_source(str(jsonl)), "prefix_suffix"),
        (cauldron.prepare(open_source(str(write_cauldron(tmp_path / "c" / "train.parquet")))), cauldron),
        (open_source(str(write_mapped(tmp_path / "m", 9))), mapped),
    ]
    return [DataPipeline(s, processor, dataclasses.replace(CFG, template=t)) for s, t in srcs]


def test_mixture_samples_by_weight_deterministically_and_resumes(tmp_path, processor):
    pipes = _pipelines(tmp_path, processor)
    names, weights = ["jsonl", "cauldron", "mapped"], [0.5, 0.3, 0.2]
    it = iter(mixture_train(pipes, weights, names, 0, 1))
    for _ in range(40):  # 160+ drawn records (one of every 8 cauldron turns is in the two-image row: skipped)
        next(it)
    c = it.counters
    drawn = {n: c[f"examples/{n}"] + c[f"skipped/{n}"] for n in names}
    total = sum(drawn.values())
    # MapDataset.mix interleaves exactly by proportion (integer-scaled 250:150:100), so over 160+ draws each
    # share is within one draw of its weight.
    for n, w in zip(names, weights):
        assert abs(drawn[n] - w * total) <= 1, (drawn, total)
    assert c["skipped_multiple_images"] == c["skipped/cauldron"] > 0 and c["skipped"] == c["skipped/cauldron"]
    # Deterministic: a fresh iterator gives the same batches; restoring mid-way continues exactly.
    a, b = iter(mixture_train(pipes, weights, names, 0, 1)), iter(mixture_train(pipes, weights, names, 0, 1))
    for _ in range(3):
        next(a), next(b)
    state = json.loads(json.dumps(a.get_state()))  # what the checkpoint stores
    expected = [next(a) for _ in range(6)]
    restored = iter(mixture_train(pipes, weights, names, 0, 1))
    restored.set_state(state)
    for e, g in zip(expected, [next(restored) for _ in range(6)]):
        assert e.keys() == g.keys() == set(pipes[0].batch_spec())
        for k in e:
            np.testing.assert_array_equal(e[k], g[k])
    assert restored.counters == a.counters


def test_mixture_component_with_no_usable_record_raises_naming_it(tmp_path, processor):
    pipes = _pipelines(tmp_path, processor, bad_jsonl=True)
    it = iter(mixture_train(pipes, [1, 1, 1], ["jsonl", "cauldron", "mapped"], 0, 1))
    with pytest.raises(ConfigError, match=r"of dataset 'jsonl'.*for example record 0: bad_image: .*0\.png'(?!;)"):
        for _ in range(30):
            next(it)


def test_mixture_evaluator_reports_each_dataset_and_a_weighted_score():
    def fake(metric, value, loss_sum, tokens, n):
        score = METRICS[metric].score(value)
        return lambda params, rest, progress=False: EvalResult(
            val_loss=loss_sum / tokens, metrics={metric: value}, score=score, num_examples=n, loss_sum=loss_sum,
            tokens=tokens, samples=[{"question": "q", "prediction": "p", "references": ["r"], "metric": metric,
                                     "score": value}])

    res = MixtureEvaluator([("docvqa", 3.0, fake("anls", 0.8, 10.0, 20.0, 5)),
                            ("ocr", 1.0, fake("cer", 0.4, 30.0, 20.0, 7))])()
    assert res.metrics == {"anls/docvqa": 0.8, "val_loss/docvqa": 0.5, "num_examples/docvqa": 5,
                           "cer/ocr": 0.4, "val_loss/ocr": 1.5, "num_examples/ocr": 7}
    assert res.score == pytest.approx((3 * 0.8 + 1 * -0.4) / 4)
    assert res.val_loss == pytest.approx(40 / 40) and res.num_examples == 12
    assert [s["dataset"] for s in res.samples] == ["docvqa", "ocr"]
    rec = res.record(4, 1.0)
    assert rec["score"] == res.score and rec["anls/docvqa"] == 0.8 and "anls" not in rec
    assert res.summary().startswith("score 0.5000: anls/docvqa 0.8000 (5), cer/ocr 0.4000 (7)")


# ------------------------------------------------------------------------------------------------ config


def test_mixture_config_overrides_and_validation():
    cfg = TrainConfig(data=DataConfig(mixture=(
        MixtureComponent(name="a", source="x.jsonl", template="prefix_suffix", weight=2.0),
        MixtureComponent(name="b", source="org/ds", subset="chartqa", template="cauldron", metric="exact_match"),
    )))
    validate(cfg)
    apply_override(cfg, "data.mixture.b.weight=0.5")
    apply_override(cfg, "data.mixture.0.metric=cer")
    apply_override(cfg, "data.mixture.b.columns=texts=turns,images=pictures")
    assert cfg.data.mixture[1].weight == 0.5 and cfg.data.mixture[0].metric == "cer"
    assert cfg.data.mixture[1].columns == ("texts=turns", "images=pictures")
    validate(cfg)
    json.dumps(cfg.to_dict())  # saved with every checkpoint
    with pytest.raises(ValueError, match="no entry 'c'"):
        apply_override(cfg, "data.mixture.c.weight=1")
    with pytest.raises(ValueError, match="names a whole entry"):
        apply_override(cfg, "data.mixture.a=1")
    bad = [
        ("data.mixture.a.metric=bleu", "registered metrics"),
        ("data.mixture.a.template=nope", "registered templates"),
        ("data.mixture.a.weight=0", "weight must be positive"),
        ("data.mixture.a.name=b", "used twice"),
        ("data.mixture.a.columns=prompt=q", "prefix_suffix"),
    ]
    for override, message in bad:
        broken = TrainConfig(data=DataConfig(mixture=tuple(dataclasses.replace(c) for c in cfg.data.mixture)))
        apply_override(broken, override)
        with pytest.raises(ValueError, match=message):
            validate(broken)
    with pytest.raises(ValueError, match="registered metrics"):
        load_config("cpu_demo.py", ["data.metric=bleu"])
    # A dataset field under data names the only dataset of a run of one; a mixture's must be named.
    with pytest.raises(ValueError, match=r"mixes 2 \['a', 'b'\].*--config.data.mixture.a.source="):
        apply_override(cfg, "data.source=other.parquet")
    single = load_config("gpu_a100.py", ["data.source=other.parquet", "data.eval_split=test", "data.columns=question=q"])
    assert [(c.source, c.eval_split, c.columns) for c in single.data.mixture] == [("other.parquet", "test", ("question=q",))]
    assert load_config("gpu_a100.py", ["data.mixture.0.source=x.parquet"]).data.mixture[0].source == "x.parquet"
    with pytest.raises(ValueError, match="evaluates it"):
        load_config("gpu_a100.py", ["data.eval_split=none"])
    with pytest.raises(ValueError, match="at least one dataset"):
        validate(TrainConfig(data=DataConfig(mixture=())))
    with pytest.raises(ValueError, match="config.model.preset=tiny"):
        load_config("gpu_a100.py", ["model.name_or_path=random:tiny"])
    assert load_config("gpu_a100.py", ["model.name_or_path=random:tiny", "model.preset=tiny"]).model.preset == "tiny"


def test_configs_load_and_the_cauldron_mixture_is_stated():
    for name in ("cpu_demo.py", "gpu_a100.py", "gpu_a100_full.py", "gpu_h100x8_full.py", "tpu_v4_32.py",
                 "tpu_v5e_16.py", "tpu_v5e_16_full.py", "tpu_v4_32_frozen.py"):
        cfg = load_config(name)
        assert not cfg.data.mixed and [c.metric for c in cfg.data.mixture] == ["anls"]
    frozen, full = load_config("tpu_v5e_16.py"), load_config("tpu_v5e_16_full.py")
    assert frozen.optim.freeze and not full.optim.freeze and full.model.remat_policy == "full"
    assert full.model.name_or_path == frozen.model.name_or_path and full.mesh == frozen.mesh
    a100, a100_full = load_config("gpu_a100.py"), load_config("gpu_a100_full.py")
    assert a100.optim.freeze and not a100_full.optim.freeze and a100_full.batch_size == 64
    assert a100_full.batch_size // a100_full.grad_accum_steps == 8 and a100_full.model.remat_policy == "full"
    assert dataclasses.replace(a100_full, batch_size=a100.batch_size, grad_accum_steps=1, model=a100.model,
                               optim=a100.optim) == a100
    large, large_frozen = load_config("tpu_v4_32.py"), load_config("tpu_v4_32_frozen.py")
    assert not large.optim.freeze and large_frozen.optim.freeze == (r"^model\.vision_tower\.",)
    assert dataclasses.replace(large_frozen, optim=large.optim) == large
    cfg = load_config("gpu_a100_cauldron.py")
    mix = {c.name: c for c in cfg.data.mixture}
    assert cfg.model.name_or_path == "florence-community/Florence-2-base-ft"
    assert {"docvqa", "chartqa", "ai2d"} <= set(mix) and mix["docvqa"].source == "HuggingFaceM4/DocumentVQA"
    assert all(c.subset == c.name for c in cfg.data.mixture if c.source == "HuggingFaceM4/the_cauldron")
    assert sum(c.weight for c in cfg.data.mixture) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ end to end

MIXTURE_CONFIG = """
from train.config import DataConfig, EvalConfig, MixtureComponent, ModelConfig, OptimConfig, TrainConfig


def get_config():
    return TrainConfig(
        max_steps=2, batch_size=8, checkpoint_every_steps=0, log_every_steps=1, eval_at_start=False,
        compilation_cache_dir=None, export_at_end=False,
        data=DataConfig(image_size=64, max_prompt_tokens=24, max_target_tokens=8, mixture=(
            MixtureComponent(name="jsonl", source="{jsonl}", eval_source="{jsonl_val}", template="prefix_suffix",
                             weight=0.3, metric="cer"),
            MixtureComponent(name="cauldron", source="{cauldron}", train_split="train[:-2]",
                             eval_split="train[-2:]", template="cauldron", weight=0.3, metric="exact_match"),
            MixtureComponent(name="mapped", source="{mapped}", template="mapped", prompt_prefix="<VQA>",
                             columns=("prompt=query", "target=label", "image=img"), weight=0.2),
            MixtureComponent(name="docvqa", source="{docvqa}", eval_split=None, weight=0.2),
        )),
        model=ModelConfig(name_or_path="random:tiny", preset="tiny", dtype="float32"),
        optim=OptimConfig(learning_rate=1e-3, freeze=()),
        eval=EvalConfig(num_beams=1, max_new_tokens=4, batch_size=8, num_print=1),
    )
"""


@pytest.mark.slow  # 93 s on a slow host; the mixture's sampling, evaluation and configs are tested by default
def test_training_on_a_mixture_of_every_format(tmp_path, capsys):
    """JSONL prefix/suffix (relative images), a Cauldron-schema parquet (every turn, held-out tail slice), a
    save_to_disk folder through mapped columns and a DocVQA-schema parquet (train only), trained together for
    2 steps; evaluation scores each evaluated dataset over all of its examples once, with its own metric."""
    from train.data.synthetic import make_records, write_parquet
    from train.main import main

    data = tmp_path / "data"
    paths = {
        "jsonl": write_jsonl(data / "j", 10, "train.jsonl"),
        "jsonl_val": write_jsonl(data / "j", 5, "val.jsonl"),
        "cauldron": write_cauldron(data / "c" / "train.parquet"),
        "mapped": write_mapped(data / "m", 6),
        "docvqa": write_parquet(make_records(12, image_size=32, seed=0), data / "d" / "train.parquet"),
    }
    config = tmp_path / "mixture.py"
    config.write_text(textwrap.dedent(MIXTURE_CONFIG).format(**{k: str(v) for k, v in paths.items()}))
    wd = tmp_path / "run"
    assert main(["--config", str(config), "--workdir", str(wd)]) == 0
    out = capsys.readouterr().out
    assert ("mixture jsonl 30% (cer), cauldron 30% (exact_match), mapped 20% (anls), docvqa 20% (anls): "
            "32 train / 15 validation records") in out  # 10 + 4 turns (of 3 rows) + 6 + 12; 5 + 4 + 6
    (rec,) = [json.loads(x) for x in (wd / "eval.jsonl").read_text().splitlines()]
    # Validation sizes: 5 JSONL lines; the last two Cauldron rows hold 3 + 1 turns; 6 mapped rows; docvqa none.
    assert (rec["num_examples/jsonl"], rec["num_examples/cauldron"], rec["num_examples/mapped"]) == (5, 4, 6)
    assert rec["num_examples"] == 15 and not any(k.endswith("/docvqa") for k in rec)
    assert {"cer/jsonl", "exact_match/cauldron", "anls/mapped", "val_loss/jsonl", "score", "val_loss"} <= set(rec)
    # The score averages the evaluated datasets by weight, CER counting negatively (lower is better).
    expected = (0.3 * -rec["cer/jsonl"] + 0.3 * rec["exact_match/cauldron"] + 0.2 * rec["anls/mapped"]) / 0.8
    assert rec["score"] == pytest.approx(expected)
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["best"] == {"score": rec["score"], "step": 2}
    counters = summary["data_counters"]
    assert sum(counters[f"examples/{n}"] for n in ("jsonl", "cauldron", "mapped", "docvqa")) == counters["examples"]
    # The 2 x 8 trained rows (not the batches the prefetcher read ahead): skipped rows are replaced.
    assert counters["examples"] == 16
