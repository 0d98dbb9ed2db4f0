"""Sharded Orbax checkpoints: one place for the on-disk layout.

    DIR/config.yaml                       the resolved run config (model, tokenizer, ...)
    DIR/checkpoints/<step>/params         parameters, a nested dict {"language_model": {"model": ...}}
    DIR/checkpoints/<step>/opt_state      optimiser state (training checkpoints only)
    DIR/checkpoints/<step>/meta           JSON: step, rng seed, data-iterator position summary
    DIR/checkpoints/<step>/data           Grain iterator state (one JSON per process)

Orbax writes each step to a temporary directory and renames it when complete, so `latest_step()`
never returns a half-written checkpoint. Restoring takes abstract targets (ShapeDtypeStruct with a
sharding), so a checkpoint saved from any mesh is read onto any other mesh, or onto one CPU.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

PARAMS, OPT_STATE, META, DATA = "params", "opt_state", "meta", "data"
CONFIG_FILE = "config.yaml"


def nest(flat: Mapping[tuple, Any]) -> dict:
    """{("a", "layers", 0, "b"): x} -> {"a": {"layers": {"0": {"b": x}}}} (string keys for Orbax)."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(str(p), {})
        node[str(path[-1])] = value
    return out


def flatten(nested: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    """Inverse of `nest`; digit keys become ints again (list indices of the model)."""
    out = {}
    for k, v in nested.items():
        key = prefix + (int(k) if isinstance(k, str) and k.isdigit() else k,)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(os.path.abspath(run_dir), "checkpoints")


def make_manager(run_dir: str, *, keep_last: int | None = None, keep_every: int | None = None,
                 async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep_last or None,
        keep_period=keep_every or None,
        enable_async_checkpointing=async_save,
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(checkpoint_dir(run_dir), options=options)


def save(mngr: ocp.CheckpointManager, step: int, *, params, opt_state=None, meta: dict | None = None,
         data_iter=None) -> None:
    """Starts an (async if configured) save of the given items at `step`."""
    items = {PARAMS: ocp.args.StandardSave(params)}
    if opt_state is not None:
        items[OPT_STATE] = ocp.args.StandardSave(opt_state)
    if meta is not None:
        items[META] = ocp.args.JsonSave(meta)
    if data_iter is not None:
        import grain

        items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
    mngr.save(step, args=ocp.args.Composite(**items), force=True)


def restore(mngr: ocp.CheckpointManager, step: int, *, params, opt_state=None, data_iter=None,
            meta: bool = False) -> dict:
    """Restores the requested items at `step` onto the shardings of the abstract targets given.

    `data_iter` is restored in place (Grain sets its state); the returned dict holds the rest.
    """
    items = {PARAMS: ocp.args.StandardRestore(params)}
    if opt_state is not None:
        items[OPT_STATE] = ocp.args.StandardRestore(opt_state)
    if meta:
        items[META] = ocp.args.JsonRestore()
    if data_iter is not None:
        import grain

        items[DATA] = grain.checkpoint.CheckpointRestore(data_iter)
    return dict(mngr.restore(step, args=ocp.args.Composite(**items)).items())


def single_device_targets(nested_shapes: Mapping) -> dict:
    """Abstract targets that place every array on the first local device (CPU-only readers)."""
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), nested_shapes)


def load_params(run_dir: str, abstract_params: Mapping, step: int | None = None) -> tuple[int, dict]:
    """(step, nested params) from a run or converted-checkpoint directory; latest complete step by default."""
    mngr = make_manager(run_dir, read_only=True)
    if step is None:
        step = mngr.latest_step()
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint under {checkpoint_dir(run_dir)}")
    elif step not in mngr.all_steps():
        raise FileNotFoundError(f"no checkpoint for step {step} under {checkpoint_dir(run_dir)} "
                                f"(have {sorted(mngr.all_steps())})")
    params = restore(mngr, step, params=abstract_params)[PARAMS]
    mngr.close()
    return step, params


def to_numpy(nested: Mapping) -> dict:
    return jax.tree.map(np.asarray, nested)
