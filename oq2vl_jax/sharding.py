"""The one place that maps logical axis names to mesh axes.

Every parameter is created with logical names (`nnx.with_partitioning(init, ("embed", "mlp"))`);
activations are constrained with `constrain(x, ("batch", "seq", "embed"))`. The table below turns
those names into mesh axes of a (data, fsdp, tensor) mesh: FSDP shards the model dimension of every
large weight over `fsdp`; `tensor` is for optional tensor parallelism; the batch is split over
`data` and `fsdp`.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("embed", "fsdp"),  # LLM model dimension
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),  # q_proj output / o_proj input (heads x head_dim)
    ("kv", None),  # k/v projections: 2 KV heads are too few to split
    ("vit_embed", "fsdp"),  # vision model dimension
    ("vit_mlp", "tensor"),
    ("vit_heads", "tensor"),
    ("norm", None),
    ("conv", None),
    ("patches", None),
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one of the sizes may be -1 (all remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {shape}")
        shape[shape.index(-1)] = len(devices) // known
    if -1 not in [data, fsdp, tensor] and int(np.prod(shape)) < len(devices) and jax.process_count() == 1:
        devices = devices[: int(np.prod(shape))]  # an explicit smaller mesh on one host: use a subset
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} devices, have {len(devices)}")
    # Auto axes: sharding propagates from the parameter and batch annotations (GSPMD style).
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
    """Activates the mesh and the logical rules: models built or run inside are sharded."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_RULES):
        yield


def logical_to_spec(names: Sequence[str | None]) -> P:
    return P(*core_spmd.from_sharding_rules(tuple(names), LOGICAL_RULES))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def batch_shards() -> int:
    """How many ways the current mesh splits the batch (1 outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = dict(LOGICAL_RULES)["batch"]
    return int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))


def replicate(tree):
    """Constrains every array of a pytree to be whole on every device (a no-op outside a mesh)."""
    if jax.sharding.get_abstract_mesh().empty:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, P()), tree)


def state_shardings(state, mesh: Mesh):
    """NamedShardings for an nnx.State (or abstract state) according to LOGICAL_RULES."""
    with nnx.logical_axis_rules(LOGICAL_RULES):
        return nnx.get_named_sharding(state, mesh)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batch arrays: leading axis over data+fsdp, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))
