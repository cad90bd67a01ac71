"""Device mesh and parameter sharding rules over parameter paths.

The mesh has two axes: ``data`` (pure data parallelism) and ``fsdp`` (data parallelism whose
parameters and optimizer state are sharded, ZeRO-3 style). Batches are split over both. A parameter is
sharded over ``fsdp`` along its largest dimension divisible by the axis size, when it is large enough
to matter; rules (regex -> PartitionSpec) given by the caller take precedence.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} does not divide the {n} devices")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} but there are {n} devices")
    return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh, *, min_size: int = 2**18,
               rules: Sequence[tuple[str, PartitionSpec]] = ()) -> PartitionSpec:
    for pattern, spec in rules:
        if re.search(pattern, path):
            return spec
    fsdp = mesh.shape["fsdp"]
    if fsdp == 1 or int(np.prod(shape or (1,))) < min_size:
        return PartitionSpec()
    dims = sorted(range(len(shape)), key=lambda d: -shape[d])
    for d in dims:
        if shape[d] % fsdp == 0:
            spec = [None] * len(shape)
            spec[d] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()


def param_sharding_fn(mesh: Mesh, min_size: int = 2**18, rules=()):
    """``(path, shape) -> NamedSharding`` for :func:`florence_jax.weights.load.load_pretrained`."""

    def fn(path: str, shape: tuple[int, ...]) -> NamedSharding:
        return NamedSharding(mesh, param_spec(path, shape, mesh, min_size=min_size, rules=rules))

    return fn


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every data-parallel axis."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
