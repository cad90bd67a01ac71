"""Hugging Face caches built offline, in the libraries' own layouts (tests only).

A user's machine resolves ``microsoft/Florence-2-base-ft`` through huggingface_hub's cache and
``HuggingFaceM4/DocumentVQA`` through the datasets cache; with ``HF_HUB_OFFLINE=1`` both read only what is
cached. These helpers write such caches from local files, so the real loaders run unchanged in tests.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["populate_datasets_cache", "populate_hub_cache"]


def populate_hub_cache(cache_dir: str | Path, repo_id: str, source: str | Path, revision: str = "main",
                       repo_type: str = "model") -> Path:
    """Copy the files of ``source`` into huggingface_hub's cache layout (``<cache>/models--org--name/
    snapshots/<commit>/...``, ``refs/<revision>``), as a download of ``repo_id`` at ``revision`` leaves them.
    The commit hash is derived from the files. Returns the snapshot directory."""
    source = Path(source)
    files = sorted(p for p in source.rglob("*") if p.is_file())
    digest = hashlib.sha1()
    for p in files:
        digest.update(str(p.relative_to(source)).encode())
        digest.update(p.read_bytes())
    commit = digest.hexdigest()
    repo = Path(cache_dir) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for p in files:
        target = snapshot / p.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, target)
    ref = repo / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    return snapshot


def populate_datasets_cache(cache_dir: str | Path, repo_id: str, splits: Mapping[str, Sequence[dict[str, Any]]],
                            features: Any, config_name: str = "default") -> Path:
    """Write ``splits`` (``{split: records}``) as the datasets library's prepared cache of the Hub dataset
    ``repo_id`` (``<cache>/org___name/<config>/0.0.0/<hash>/`` with Arrow files and ``dataset_info.json``), what
    a first online ``load_dataset(repo_id)`` leaves and an offline one reads. Returns that directory."""
    import datasets
    from datasets.arrow_writer import ArrowWriter
    from datasets.naming import camelcase_to_snakecase

    namespace, name = repo_id.split("/")
    snake = camelcase_to_snakecase(name)
    out = Path(cache_dir) / f"{namespace}___{snake}" / config_name / "0.0.0" / ("0" * 16)
    out.mkdir(parents=True, exist_ok=True)
    split_dict = datasets.SplitDict(dataset_name=snake)
    for split, rows in splits.items():
        with ArrowWriter(features=features, path=str(out / f"{snake}-{split}.arrow")) as writer:
            for row in rows:
                writer.write(features.encode_example(row))
            count, size = writer.finalize()
        split_dict.add(datasets.SplitInfo(name=split, num_examples=count, num_bytes=size, dataset_name=snake))
    datasets.DatasetInfo(features=features, config_name=config_name, dataset_name=snake, splits=split_dict,
                         builder_name="parquet", version="0.0.0").write_to_directory(str(out))
    return out
