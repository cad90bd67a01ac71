"""Data-parallel generation for the labeller: every local device runs the single-device program on its slice of
the batch.

*One program per device, no collectives.* Parameters are replicated over a 1-D ``data`` mesh of this process's
devices and the batch is split over it. Each program runs under ``shard_map``, so a device runs exactly what one
device runs for a batch of ``per_device`` rows (:func:`florence_jax.generation.decode_loop`), and its decoding
loop stops when *its* rows are done rather than waiting for the slowest row of the whole batch. Nothing crosses
devices or processes, so several processes (``jax.distributed`` or independent jobs) label their own shards at
their own pace.

*Vision once per image.* :meth:`ShardedGenerator.image_features` runs the vision tower and projector once per
batch of images; :meth:`ShardedGenerator.generate` runs a task's prompt against those features (embedding merge,
BART encoder, decoding). Several tasks per image therefore cost one vision pass. Programs are compiled once per
(prompt-length bucket, generation settings): prompts are padded (masked) to a multiple of 16 tokens.

Both calls return device arrays without waiting (JAX dispatches asynchronously), so the caller prepares and
post-processes the previous batch on the host while the devices work.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from florence_jax.devices import to_host
from florence_jax.generation import (
    DecodeControls,
    DecodeStatic,
    Generator,
    decode_loop,
    jit_with_options,
    merge_for_inference,
)

__all__ = ["Pending", "ShardedGenerator", "local_mesh"]

AXIS = "data"


def local_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D ``data`` mesh over this process's devices (all of them by default)."""
    devices = list(devices if devices is not None else jax.local_devices())
    return Mesh(np.asarray(devices), (AXIS,))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _features_jit(graphdef, mesh: Mesh, state, pixels):
    def local(state, pixels):
        return merge_for_inference(graphdef, state).get_image_features(pixels, image_layout="NHWC")

    spec = PartitionSpec(AXIS)
    return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), spec), out_specs=spec,
                         check_vma=False)(state, pixels)


def _generate(graphdef, static: DecodeStatic, mesh: Mesh, state, input_ids, features, attention_mask,
              controls: DecodeControls):
    def local(state, input_ids, features, attention_mask, controls):
        model = merge_for_inference(graphdef, state)
        enc = model.encode(input_ids, attention_mask=attention_mask, image_features=features)
        out = decode_loop(model, enc, attention_mask, controls, static)
        return out.sequences, out.length[None]

    rows, replicated = PartitionSpec(AXIS), PartitionSpec()
    # check_vma off: the decoding loop's carries start as constants (the same on every device) and become
    # per-device values; everything in these programs is per device, which the out_specs say.
    return jax.shard_map(local, mesh=mesh, in_specs=(replicated, rows, rows, rows, replicated),
                         out_specs=(rows, rows), check_vma=False)(state, input_ids, features, attention_mask,
                                                                  controls)


class Pending(NamedTuple):
    """A generation in flight: ``sequences`` (rows, max_length) uncropped, ``lengths`` one per device."""

    sequences: jax.Array
    lengths: jax.Array

    def result(self) -> np.ndarray:
        """The sequences on the host, cut to the longest device's output (rows past their EOS hold padding)."""
        return to_host(self.sequences)[:, : int(to_host(self.lengths).max())]


class ShardedGenerator:
    """A :class:`~florence_jax.generation.Generator`'s model and options, run data parallel over ``mesh``.

    ``rows`` of every call must be a multiple of the mesh size (the caller pads the last batch).
    """

    def __init__(self, generator: Generator, mesh: Mesh | None = None):
        self.generator = generator
        self.mesh = mesh if mesh is not None else local_mesh()
        self._rows = NamedSharding(self.mesh, PartitionSpec(AXIS))
        self._state = jax.device_put(generator.state, NamedSharding(self.mesh, PartitionSpec()))

    @property
    def num_devices(self) -> int:
        return int(self.mesh.devices.size)

    def _put(self, x: Any) -> jax.Array:
        x = np.asarray(x)
        if x.shape[0] % self.num_devices:
            raise ValueError(f"{x.shape[0]} rows do not split over {self.num_devices} devices")
        return jax.device_put(x, self._rows)

    def image_features(self, pixels_nhwc: np.ndarray) -> jax.Array:
        """Vision tower + projector of float32 ``(rows, H, W, 3)`` pixels: ``(rows, tokens, dim)``, on the devices."""
        return _features_jit(self.generator.graphdef, self.mesh, self._state, self._put(pixels_nhwc))

    def generate(self, input_ids: np.ndarray, features: jax.Array, attention_mask: np.ndarray,
                 **options: Any) -> Pending:
        """Generation for ``input_ids`` (image placeholders + prompt, right-padded) against ``features``; options
        over the generator's (:class:`~florence_jax.generation.GenerationOptions` fields)."""
        static, controls = self.generator.resolve(**options)
        ids = self._put(np.asarray(input_ids, np.int32))
        mask = self._put(np.asarray(attention_mask, np.int32))
        program = jit_with_options(_generate, (0, 1, 2), self.generator.decode_options)
        sequences, lengths = program(self.generator.graphdef, static, self.mesh, self._state, ids, features, mask,
                                     controls)
        return Pending(sequences, lengths)
