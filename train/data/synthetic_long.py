"""Synthetic long outputs: a generated form extracted as JSON, hundreds of tokens past a checkpoint's positions.

Why this exists: a full page of OCR or a form as JSON easily runs past the 1,024 target positions Florence-2-base
learned. This task makes such targets, at a size a CPU trains in minutes, so growing the positions
(``config.model.max_positions``, :mod:`florence_jax.positions`) can be shown to learn the tokens past the old
limit (``scripts/long_targets.py`` scores accuracy per position range).

A record's prompt names four items (``"<FORM> pen ink cap box"``); its target lists ``rows`` rows as JSON,
``[{"id": 1, "item": "pen"}, {"id": 2, "item": "ink"}, ...]``, the items in the prompt's order, over and over,
the ids counting up. Every token is determined by the prompt and the row it is in, so a model that keeps its
place can reach full accuracy at every position; one that cannot tell position 700 from position 200 cannot.
The rows repeat n-grams by design (``", "item": "``): a no-repeat n-gram ban breaks it, so its template
(``json``) is a structured one (``train.data.templates.STRUCTURED_TEMPLATES``).

The image is a plain grey square: the answer does not depend on it (the vision tower is irrelevant here; the
configs freeze it). Rows follow the ``json`` template's columns (``prompt``, ``target``, ``image``) and are
written to parquet with the ``datasets`` Image feature. Deterministic given the seed; validation comes from
another seed stream.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["ITEMS", "PROMPT", "ROWS", "form_target", "generate", "make_records"]

ITEMS = ("pen", "ink", "cap", "box", "cup", "key", "map", "bag", "hat", "jar", "pin", "saw")
PROMPT = "<FORM>"
ROWS = 26  # 573-600 target tokens (with <s> and </s>) with the shipped reader's tokenizer: past its 512 positions
ITEMS_PER_FORM = 4


def form_target(items: list[str], rows: int) -> str:
    """The JSON answer for a form naming ``items``: ``rows`` rows cycling through them."""
    return json.dumps([{"id": i + 1, "item": items[i % len(items)]} for i in range(rows)])


def _image(size: int) -> dict[str, Any]:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def make_records(n: int, seed: int, *, rows: int = ROWS, image_size: int = 64) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    image = _image(image_size)
    out = []
    for _ in range(n):
        items = [str(x) for x in rng.choice(ITEMS, size=ITEMS_PER_FORM, replace=False)]
        out.append({"prompt": " ".join([PROMPT, *items]), "target": form_target(items, rows), "image": image})
    return out


def generate(out_dir: str | os.PathLike[str], num_train: int, num_val: int, image_size: int = 64, seed: int = 0,
             *, rows: int = ROWS) -> dict[str, str]:
    """Write ``train.parquet`` and ``validation.parquet`` to ``out_dir``; returns {split: path}."""
    import datasets

    features = datasets.Features({"prompt": datasets.Value("string"), "target": datasets.Value("string"),
                                  "image": datasets.Image()})
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split, n, s in (("train", num_train, seed), ("validation", num_val, seed + 1_000_003)):
        path = os.path.join(out_dir, f"{split}.parquet")
        datasets.Dataset.from_list(make_records(n, s, rows=rows, image_size=image_size),
                                   features=features).to_parquet(path)
        paths[split] = path
    return paths
