"""Sharded Orbax checkpoints: one place for the on-disk layout.

    DIR/config.yaml                       the resolved run config (model, tokenizer, ...)
    DIR/checkpoints/<step>/params         parameters, a nested dict {"language_model": {"model": ...}}
    DIR/checkpoints/<step>/opt_state      optimiser state (training checkpoints only)
    DIR/checkpoints/<step>/meta           JSON: step, rng seed
    DIR/checkpoints/<step>/data           Grain iterator state (one JSON per process)

Orbax writes each step to a temporary directory and renames it when complete, so `latest_step()`
never returns a half-written checkpoint. Restoring takes abstract targets (ShapeDtypeStruct with a
sharding), so a checkpoint saved from any mesh is read onto any other mesh, or onto one CPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from oq2vl_jax.cli import UserError
from oq2vl_jax.treepaths import dotted, flatten, nest  # noqa: F401  nest: callers use checkpoint.nest

PARAMS, OPT_STATE, META, DATA = "params", "opt_state", "meta", "data"
CONFIG_FILE = "config.yaml"


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(os.path.abspath(run_dir), "checkpoints")


def make_manager(run_dir: str, *, keep_last: int | None = None, keep_every: int | None = None,
                 async_save: bool = True, read_only: bool = False,
                 save_concurrent_gb: int | None = None, on_finalized=None) -> ocp.CheckpointManager:
    """`save_concurrent_gb` bounds the params bytes Orbax serialises at once (its default, 96 GB, lets
    a host-memory save hold a copy of everything in flight); only for managers that save params alone.
    `on_finalized()` runs on the primary host after an async save's files are final, before the rename."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep_last or None,
        keep_period=None if read_only else keep_every or None,
        save_interval_steps=0 if read_only else 1,  # a reader sets nothing Orbax would override with a warning
        enable_async_checkpointing=async_save,
        create=not read_only,
        read_only=read_only,
        # A save killed mid-way leaves STEP.orbax-checkpoint-tmp-*: never resumed from, but tens of GB.
        cleanup_tmp_directories=not read_only,
        async_options=(ocp.AsyncOptions(post_finalization_callback=on_finalized)
                       if on_finalized is not None and async_save else None),
    )
    handlers = None
    if save_concurrent_gb is not None:
        handlers = {PARAMS: ocp.StandardCheckpointHandler(save_concurrent_gb=save_concurrent_gb)}
    with _absl_quiet() if read_only else contextlib.nullcontext():
        return ocp.CheckpointManager(checkpoint_dir(run_dir), options=options, item_handlers=handlers)


@contextlib.contextmanager
def _absl_quiet():
    """Orbax warns through absl that a read-only manager's directory is read-only, which is what the
    reader asked for; a user loading a checkpoint for generation should not see it."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


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
    items = {} if params is None else {PARAMS: ocp.args.StandardRestore(params)}
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
    from oq2vl_jax import integrity

    integrity.verify(os.path.join(checkpoint_dir(run_dir), str(step)))  # a damaged file named first
    check_saved_params(run_dir, step, abstract_params)
    params = restore(mngr, step, params=abstract_params)[PARAMS]
    mngr.close()
    return step, params


def to_numpy(nested: Mapping) -> dict:
    return jax.tree.map(np.asarray, nested)


def save_config(run_dir: str, cfg) -> str:
    """Writes the run `Config` as DIR/config.yaml (plain YAML, readable by config.load_config)."""
    import yaml

    from oq2vl_jax.config import to_dict

    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, CONFIG_FILE)
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    return path


def resolve_checkpoint_config(run_dir: str):
    """The `Config` stored beside a checkpoint, with a relative `tokenizer` path resolved.

    A converted checkpoint carries its tokenizer as DIR/tokenizer and stores the relative path
    "tokenizer", so the directory can be moved as a whole. A relative path that does not exist under
    DIR is left as it is (a run config written with paths relative to the launch directory).
    """
    import dataclasses

    from oq2vl_jax.config import load_config

    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir!r} is not a checkpoint directory: {CONFIG_FILE} is missing")
    cfg = load_config(path)
    tok = cfg.tokenizer
    if tok and not os.path.isabs(tok) and os.path.exists(os.path.join(run_dir, tok)):
        cfg = dataclasses.replace(cfg, tokenizer=os.path.abspath(os.path.join(run_dir, tok)))
    return cfg


def saved_param_shapes(run_dir: str, step: int) -> dict:
    """The nested {name: ShapeDtypeStruct} of the params saved at `step`, read from Orbax metadata."""
    from etils import epath

    path = epath.Path(checkpoint_dir(run_dir)) / str(step) / PARAMS
    meta = ocp.PyTreeCheckpointHandler().metadata(path)
    tree = getattr(meta, "tree", meta)
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)


class CheckpointMismatch(UserError, ValueError):
    """A checkpoint's parameters do not fit the model config; the message names them."""


def check_saved_params(run_dir: str, step: int, abstract_params: Mapping) -> None:
    """Raises a ValueError naming the parameters a model (nested abstract params) and the checkpoint
    at `step` disagree on (missing, extra or differently shaped), instead of Orbax's tree error."""
    saved = {k: tuple(v.shape) for k, v in flatten(saved_param_shapes(run_dir, step)).items()}
    want = {k: tuple(v.shape) for k, v in flatten(abstract_params).items()}
    problems = [f"missing {dotted(k)}" for k in sorted(want.keys() - saved.keys(), key=dotted)]
    problems += [f"extra {dotted(k)}" for k in sorted(saved.keys() - want.keys(), key=dotted)]
    problems += [f"{dotted(k)} saved {saved[k]}, model {want[k]}" for k in sorted(want.keys() & saved.keys(), key=dotted)
                 if saved[k] != want[k]]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointMismatch(f"{checkpoint_dir(run_dir)}/{step} does not fit this model config: "
                         f"{'; '.join(problems[:5])}{more}")


def load_params_as_saved(run_dir: str, step: int | None = None) -> tuple[int, dict]:
    """(step, nested params) on one local device, each with the shape and dtype it was saved with.

    For readers that don't build the model (export, inspection); works whatever mesh saved it.
    """
    if step is None:
        mngr = make_manager(run_dir, read_only=True)
        step = mngr.latest_step()
        mngr.close()
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint under {checkpoint_dir(run_dir)}")
    if not os.path.isdir(os.path.join(checkpoint_dir(run_dir), str(step), PARAMS)):
        raise FileNotFoundError(f"no params for step {step} under {checkpoint_dir(run_dir)}")
    return load_params(run_dir, single_device_targets(saved_param_shapes(run_dir, step)), step=step)
