"""A checkpoint that does not restore is moved aside and the next newest one is used; none restoring is one
clear error. Every file of a checkpoint is damaged in turn (truncated, then deleted)."""

from __future__ import annotations

import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from train.checkpoint import Checkpointer, CheckpointRestoreError, abstract_like


def _state(step: int):
    return {"params": {"w": jnp.full((64, 32), float(step)), "b": jnp.arange(7, dtype=jnp.float32) + step},
            "step": jnp.asarray(step)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    ckpt = Checkpointer(root, keep=3, async_save=False)
    for step in (10, 20):
        ckpt.save(step, _state(step), {"position": step}, {"step": step}, force=True)
    ckpt.close()
    files = sorted(p.relative_to(root / "20") for p in (root / "20").rglob("*") if p.is_file())
    assert len(files) >= 5, files  # state arrays and their metadata, data position, meta, step metadata
    return root, files


def _restore(root):
    ckpt = Checkpointer(root, keep=3, async_save=False)
    try:
        return ckpt.restore_latest(abstract_like(_state(0)))
    finally:
        ckpt.close()


def test_an_intact_run_restores_its_latest_checkpoint(saved, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(saved[0], root)
    step, state, data, meta = _restore(root)
    assert step == 20 and data == {"position": 20} and meta["step"] == 20
    np.testing.assert_array_equal(state["params"]["w"], np.full((64, 32), 20.0))


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_each_damaged_file_falls_back_to_the_previous_checkpoint(saved, tmp_path, damage, capsys):
    source, files = saved
    fell_back = set()
    for i, rel in enumerate(files):
        root = tmp_path / f"{i}" / "checkpoints"
        shutil.copytree(source, root)
        path = root / "20" / rel
        if damage == "delete":
            path.unlink()
        else:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        step, state, data, _ = _restore(root)
        # Either the damage did not matter (the file is not read to restore: a restore gives the same values)
        # or step 20 was moved aside, kept, and step 10 restored.
        if step == 20:
            np.testing.assert_array_equal(state["params"]["b"], np.arange(7) + 20.0)
            np.testing.assert_array_equal(state["params"]["w"], np.full((64, 32), 20.0))
            assert data == {"position": 20}
            continue
        fell_back.add(str(rel))
        assert step == 10 and data == {"position": 10}, rel
        np.testing.assert_array_equal(state["params"]["w"], np.full((64, 32), 10.0))
        assert (root.parent / "checkpoints_unreadable" / "20" / rel).parent.exists()  # moved, never deleted
        assert not (root / "20").exists()
        out = capsys.readouterr().out
        assert "checkpoint 20 does not restore" in out and "moved to" in out and out.count("\n") == 1
    # What a restore reads: the data position, the metadata and the arrays themselves (the merged OCDBT store).
    needed = {"data/process_0-of-1.json", "meta/metadata", "state/manifest.ocdbt"}
    assert needed <= fell_back and any(name.startswith("state/d/") for name in fell_back), fell_back


def test_no_checkpoint_restoring_is_one_clear_error(saved, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(saved[0], root)
    for step in ("10", "20"):
        (root / step / "meta" / "metadata").unlink()
    with pytest.raises(CheckpointRestoreError, match="no checkpoint in .* restores .* new --workdir"):
        _restore(root)
    assert sorted(p.name for p in (tmp_path / "checkpoints_unreadable").iterdir()) == ["10", "20"]
