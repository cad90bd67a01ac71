"""Device mesh and parameter sharding rules over parameter paths.

The mesh has two axes: ``data`` (pure data parallelism) and ``fsdp`` (data parallelism whose
parameters and optimizer state are sharded, ZeRO-3 style). Batches are split over both. A parameter is
sharded over ``fsdp`` along its largest dimension divisible by the axis size, when it is large enough
to matter; rules (regex -> PartitionSpec) given by the caller take precedence. Optionally the optimizer
state and the update are split over ``data`` as well (ZeRO-1, :func:`optimizer_spec`), while the
parameters stay as they are.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

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


def optimizer_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh, *,
                   min_size: int = 2**18) -> PartitionSpec:
    """Where a parameter's optimizer state and update live when they are split over ``data`` too (ZeRO-1):
    ``spec`` (the parameter's) with one dimension further split over ``data``. A dimension already split
    over ``fsdp`` becomes split over ``("fsdp", "data")`` when it divides: in that order each device's share
    lies inside the fsdp shard it holds and is sliced locally (``("data", "fsdp")`` sent the shares between
    devices). Else the largest unsplit dimension that ``data`` divides. Parameters smaller than
    ``min_size``, or with no such dimension, keep ``spec``."""
    n = mesh.shape.get("data", 1)
    if n == 1 or int(np.prod(shape or (1,))) < min_size:
        return spec
    entries = list(spec) + [None] * (len(shape) - len(spec))
    for d, e in enumerate(entries):
        if e == "fsdp" and shape[d] % (n * mesh.shape["fsdp"]) == 0:
            entries[d] = ("fsdp", "data")
            return PartitionSpec(*entries)
    for d in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if entries[d] is None and shape[d] % n == 0:
            entries[d] = "data"
            return PartitionSpec(*entries)
    return spec


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


# The mesh of the step being traced (fsdp_compute), for the code inside the model that must know it.
_COMPUTE_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("compute_mesh", default=None)


@contextlib.contextmanager
def fsdp_compute(mesh: Mesh):
    """While tracing under this, :func:`gather_for_compute` gathers parameters whole on each device (when
    ``mesh`` has an ``fsdp`` axis of more than one device; otherwise it changes nothing), and
    :func:`step_mesh` is ``mesh``: a Pallas kernel (DaViT's fused window attention) runs per device under
    ``shard_map`` over it, since XLA's partitioner cannot split a kernel.

    With parameters stored split over ``fsdp`` and nothing said about how they are used, XLA's partitioner
    may run a layer on the whole fsdp group's batch with a slice of each weight's output channels,
    all-gathering the activations (hundreds of MB per layer for DaViT at 768 px) instead of the weight (a
    few MB): the libtpu compile of ``tpu_v4_32_frozen.py`` did so throughout the vision tower
    (docs/scale-out.md). Entered inside the jitted step, so each compiled program always sees one mesh.
    """
    token = _COMPUTE_MESH.set(mesh)
    try:
        yield
    finally:
        _COMPUTE_MESH.reset(token)


def gather_for_compute(tree):
    """Every array of ``tree`` (parameters) whole on each device, under :func:`fsdp_compute`; else ``tree``
    as it is. The forward pass then multiplies batch-split activations by whole weights, and the backward
    pass returns each weight's gradient split as the weight is stored (a reduce-scatter): ZeRO-3's
    traffic, with the compiler choosing when each gather runs."""
    mesh = _COMPUTE_MESH.get()
    if mesh is None or dict(mesh.shape).get("fsdp", 1) == 1:
        return tree
    whole = replicated(mesh)
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, whole) if hasattr(x, "shape") else x, tree)


def step_mesh() -> Mesh | None:
    """The mesh of the step being traced under :func:`fsdp_compute`, or None outside one."""
    return _COMPUTE_MESH.get()


def kernel_batch_split(x: jax.Array):
    """(mesh, axes) over which a kernel on ``x`` runs per device under ``shard_map``: the batch axes of the
    mesh ``x`` is split over, when ``x``'s leading dimension divides among them; (mesh, ()) when it runs whole.

    A Mosaic kernel cannot be split by XLA's partitioner (it refuses to compile one on a sharded input), so
    the TPU kernels run under ``shard_map`` over the batch axes, each device on its own examples. The mesh
    is the input's (its type carries it when the program was called with sharded arrays, as generation is)
    or else the step's (:func:`step_mesh`: the train and evaluation steps, whose shardings are given to
    ``jit``)."""
    mesh = jax.typeof(x).sharding.mesh
    if not mesh.axis_names:  # a program given its shardings rather than sharded arrays: the step's mesh
        mesh = step_mesh() or mesh
    axes = tuple(a for a, kind in zip(mesh.axis_names, mesh.axis_types)
                 if a in BATCH_AXES and kind != AxisType.Manual and mesh.shape[a] > 1)
    if axes and x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        axes = ()
    return mesh, axes


def per_batch_shard(fn, x: jax.Array, *whole: jax.Array) -> jax.Array:
    """``fn(x, *whole)`` for a kernel ``fn`` that XLA's partitioner cannot split and whose examples are
    independent along ``x``'s leading dimension: on a mesh, under ``shard_map`` over
    :func:`kernel_batch_split`'s axes (each device on its own examples, ``whole``, e.g. parameters, on every
    device whole); otherwise ``fn(x, *whole)``."""
    mesh, axes = kernel_batch_split(x)
    if not axes:
        return fn(x, *whole)
    spec = PartitionSpec(axes)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) + (PartitionSpec(),) * len(whole), out_specs=spec,
                         check_vma=False)(x, *whole)
