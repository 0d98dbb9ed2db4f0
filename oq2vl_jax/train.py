"""The main job: `python -m oq2vl_jax.train --config configs/NAME.yaml [--workdir DIR] [--set k=v ...]`.

Builds the mesh and the sharded train state (random init, a converted checkpoint via
`train.init_from`, or the latest complete checkpoint in WORKDIR, which always wins: resuming is
automatic), then runs the jitted step over Grain batches, logging, evaluating and checkpointing
(params, optimiser state, step and data-iterator position together). SIGTERM saves and exits cleanly;
a non-finite loss stops the run naming the step, leaving the last good checkpoint intact.

Multi-host: each process runs this same command; `jax.distributed.initialize()` is called when
SLURM (several tasks) or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID say so.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from oq2vl_jax import checkpoint as ckpt
from oq2vl_jax.config import Config, ConfigError, load_config, to_dict
from oq2vl_jax.flops import train_step_flops
from oq2vl_jax.metrics import MetricsLogger
from oq2vl_jax.models import build_abstract, build_sharded, flat_params
from oq2vl_jax.sharding import make_mesh, use_mesh
from oq2vl_jax.train_step import (MODEL_KEYS, all_params, batch_shardings, make_steps, optimizer, split_params,
                                  state_shardings)

log = logging.getLogger("oq2vl_jax.train")


class NonFiniteLoss(RuntimeError):
    pass


def init_distributed() -> None:
    """Joins a multi-process run when the environment describes one; a no-op otherwise."""
    explicit = os.environ.get("JAX_COORDINATOR_ADDRESS")
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if not (explicit or slurm):
        return
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU needs a collectives backend
    if explicit:
        jax.distributed.initialize(
            coordinator_address=explicit,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()  # SLURM: coordinator, process count and id from the environment


def check_tokenizer(cfg: Config) -> None:
    """The model's image placeholder id must be the tokenizer's `<|image_pad|>` the data was packed with."""
    if not cfg.tokenizer:
        return
    if cfg.model.arch == "qwen2_vl":
        return check_qwen2_vl_tokenizer(cfg)
    from oq2vl_jax.data.tokenizer import load_tokenizer, special_ids

    if not os.path.isdir(cfg.tokenizer):
        raise ConfigError(f"tokenizer: {cfg.tokenizer!r} is not a directory")
    ids = special_ids(load_tokenizer(cfg.tokenizer))
    if ids.image != cfg.model.image_token_id:
        raise ConfigError(f"model.image_token_id={cfg.model.image_token_id} but the tokenizer {cfg.tokenizer!r} "
                          f"has <|image_pad|> = {ids.image}")
    if ids.vocab_len > cfg.model.text.vocab_size:
        raise ConfigError(f"model.text.vocab_size={cfg.model.text.vocab_size} < tokenizer size {ids.vocab_len}")


def check_qwen2_vl_tokenizer(cfg: Config) -> None:
    """model.arch qwen2_vl: the image / vision start / vision end ids are the tokenizer's."""
    from oq2vl_jax.data.qwen2_vl_text import load_qwen2_vl_tokenizer, qwen2_vl_ids

    if not os.path.isdir(cfg.tokenizer):
        raise ConfigError(f"tokenizer: {cfg.tokenizer!r} is not a directory")
    try:
        ids = qwen2_vl_ids(load_qwen2_vl_tokenizer(cfg.tokenizer))
    except ValueError as e:
        raise ConfigError(f"tokenizer {cfg.tokenizer!r}: {e}") from None
    m = cfg.model
    for name, ours, theirs in (("image_token_id", m.image_token_id, ids.image),
                               ("vision_start_token_id", m.vision_start_token_id, ids.vision_start),
                               ("vision_end_token_id", m.vision_end_token_id, ids.vision_end)):
        if ours != theirs:
            raise ConfigError(f"model.{name}={ours} but the tokenizer {cfg.tokenizer!r} has {theirs}")
    if ids.vocab_len > m.text.vocab_size:
        raise ConfigError(f"model.text.vocab_size={m.text.vocab_size} < tokenizer size {ids.vocab_len}")


def loader_config(cfg: Config, rows_per_process: int, sources, shuffle: bool):
    from oq2vl_jax.data.loader import LoaderConfig

    qwen2_vl = cfg.model.arch == "qwen2_vl"
    return LoaderConfig(
        sources=tuple(sources), batch_size=rows_per_process, seq_len=cfg.data.seq_len,
        max_images=cfg.data.max_images, image_size=cfg.model.vision.image_size, seed=cfg.data.seed,
        num_workers=cfg.data.num_workers, shuffle=shuffle, mode=cfg.data.mode, image_dtype=cfg.data.image_dtype,
        image_tokens=cfg.model.image_tokens,
        qwen2_vl=cfg.model.qwen2_vl_vision if qwen2_vl else None,
        max_patches=(cfg.data.max_patches or 4 * cfg.data.seq_len) if qwen2_vl else 0,
        image_token_id=cfg.model.image_token_id,
    )


def check_segments(cfg: Config) -> None:
    """The cuDNN packed layout has model.max_segments slots per row; more would be dropped silently.
    Checked from the packer's stats at start-up, identically on every host."""
    if cfg.model.attention != "cudnn":
        return
    from oq2vl_jax.data.loader import pack_stats

    paths = [s.path for s in cfg.data.sources] + ([cfg.data.eval_source] if cfg.data.eval_source else [])
    for path in paths:
        most = (pack_stats(path) or {}).get("max_samples_in_row", 0)
        if most > cfg.model.max_segments:
            raise ConfigError(f"{path} has rows of up to {most} samples > model.max_segments="
                              f"{cfg.model.max_segments}; raise it or repack with --max-samples-per-row")


def resolve_steps(cfg: Config) -> Config:
    """With train.epochs > 0, the config with train.steps computed from the one source's row count."""
    if not cfg.train.epochs:
        return cfg
    from oq2vl_jax.data.loader import pack_stats

    if len(cfg.data.sources) != 1:
        raise ConfigError(f"train.epochs needs exactly one data source (got {len(cfg.data.sources)}); "
                          "with mixed sources set train.steps")
    path = cfg.data.sources[0].path
    rows = (pack_stats(path) or {}).get("rows")
    if not rows:
        raise ConfigError(f"train.epochs: no row count in {path}/stats.json (written by oq2vl_jax.data.pack); "
                          "set train.steps instead")
    steps = math.ceil(cfg.train.epochs * rows / cfg.data.global_batch_size)
    log.info("train.epochs=%g over %d rows of %s: %d steps", cfg.train.epochs, rows, path, steps)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=max(steps, 1)))


def check_schedule(cfg: Config) -> None:
    """A continued schedule (optim.schedule_offset) must lie inside the curve it continues: past the
    curve's end the learning rate is lr * final_lr_ratio (0 by default) for every remaining step."""
    o, steps = cfg.optim, cfg.train.steps
    if o.schedule_offset and not o.schedule_steps:
        raise ConfigError(f"optim.schedule_offset={o.schedule_offset} needs optim.schedule_steps, the length "
                          "of the warmup+cosine curve it continues")
    if o.schedule_steps and o.schedule_offset + steps > o.schedule_steps:
        raise ConfigError(f"optim.schedule_offset={o.schedule_offset} + train.steps={steps} runs past "
                          f"optim.schedule_steps={o.schedule_steps}: the steps after it would train at "
                          f"lr x final_lr_ratio = {o.lr * o.final_lr_ratio:g}")


def agreed(flag: bool) -> bool:
    """True on every process if it is true on any (a stop must be taken by all hosts at one step)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def to_global(local: dict, shardings: dict, micro: int | None) -> dict:
    """Per-process numpy batch -> global jax arrays; with `micro`, rows are split into micro-batches."""
    out = {}
    n_proc = jax.process_count()
    for k in shardings:
        x = np.asarray(local[k])
        if micro is not None:
            x = x.reshape((micro, x.shape[0] // micro) + x.shape[1:])
            global_shape = (micro, x.shape[1] * n_proc) + x.shape[2:]
        else:
            global_shape = (x.shape[0] * n_proc,) + x.shape[1:]
        out[k] = jax.make_array_from_process_local_data(shardings[k], x, global_shape)
    return out


class Trainer:
    """Owns the mesh, the jitted steps, the state and the checkpoint manager of one run."""

    def __init__(self, cfg: Config, workdir: str):
        self.cfg, self.workdir = cfg, workdir
        d = cfg.data
        n_proc = jax.process_count()
        if d.global_batch_size % (cfg.train.micro_batches * n_proc):
            raise ConfigError(f"data.global_batch_size={d.global_batch_size} is not divisible by "
                              f"train.micro_batches x processes = {cfg.train.micro_batches} x {n_proc}")
        self.rows_per_process = d.global_batch_size // n_proc
        self.mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
        rows_per_micro = d.global_batch_size // cfg.train.micro_batches
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if rows_per_micro % shards:
            fits = [m for m in range(cfg.train.micro_batches, 0, -1)
                    if d.global_batch_size % (m * n_proc) == 0 and (d.global_batch_size // m) % shards == 0]
            hint = f"; e.g. train.micro_batches={fits[0]}" if fits else ""
            raise ConfigError(f"data.global_batch_size={d.global_batch_size} / train.micro_batches="
                              f"{cfg.train.micro_batches} = {rows_per_micro} rows per micro-batch do not split "
                              f"over mesh data x fsdp = {shards} devices{hint}")
        if cfg.train.loss_reduction == "micro_batch_mean" and rows_per_micro % cfg.train.loss_group_rows:
            raise ConfigError(f"train.loss_group_rows={cfg.train.loss_group_rows} does not divide the "
                              f"{rows_per_micro} rows per micro-batch")

        self.graphdef, abstract = build_abstract(cfg.model, self.mesh)
        abs_flat = flat_params(abstract)
        self.param_shardings = {p: a.sharding for p, a in abs_flat.items()}
        abs_train, abs_frozen = split_params(abs_flat, cfg)
        # The tower counts 3x (forward + backward) in MFU when any of its blocks trains.
        self.vision_trained = "vision_tower" in abs_train or "blocks" in abs_train.get("visual", {})
        self.tx = optimizer(cfg, abs_train)
        abs_state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abs_train, "frozen": abs_frozen,
                     "opt_state": jax.eval_shape(self.tx.init, abs_train)}
        self.shardings = state_shardings(abs_state, self.param_shardings, self.tx, self.mesh)
        self.abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                           abs_state, self.shardings)

        train_step, eval_step = make_steps(self.graphdef, cfg, self.tx)
        rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.train_step = self._in_mesh(jax.jit(train_step, in_shardings=(self.shardings, None),
                                                out_shardings=(self.shardings, rep), donate_argnums=(0,)))
        self.eval_step = self._in_mesh(jax.jit(eval_step, in_shardings=(self.shardings, None), out_shardings=rep))
        self.mngr = ckpt.make_manager(workdir, keep_last=cfg.train.keep_last, keep_every=cfg.train.keep_every,
                                      async_save=cfg.train.async_checkpointing)

    def _in_mesh(self, jitted):
        """Calls (and so traces) a jitted step inside the mesh, where the model's activation
        sharding constraints (sharding.constrain) take effect; outside one they are no-ops."""
        def within(fn):
            def call(*args):
                with use_mesh(self.mesh):
                    return fn(*args)
            return call
        call = within(jitted)
        call.lower, call.trace = within(jitted.lower), within(jitted.trace)
        return call

    # ----- state -----------------------------------------------------------------------------------
    def _abstract_params(self) -> dict:
        """Restore target for the `params` item: all parameters, with their shardings."""
        return all_params(self.abstract_state)

    def _with_fresh_opt(self, flat: dict) -> dict:
        train, frozen = split_params(flat, self.cfg)
        with use_mesh(self.mesh):
            opt_state = jax.jit(self.tx.init, out_shardings=self.shardings["opt_state"])(train)
        return {"step": jnp.zeros((), jnp.int32), "params": train, "frozen": frozen, "opt_state": opt_state}

    def initial_state(self, data_iter) -> tuple[dict, int]:
        """(state, step): the latest checkpoint in the workdir, else init_from, else random."""
        step = self.mngr.latest_step()
        if step is not None:
            ckpt.check_saved_params(self.workdir, step, self._abstract_params())
            # Checkpoints saved before the iterator state carried its layout have it in meta "data" only.
            saved = ckpt.restore(self.mngr, step, params=None, meta=True)[ckpt.META].get("data")
            if data_iter is not None and saved is not None and saved != self._legacy_data_layout():
                raise ConfigError(f"{ckpt.checkpoint_dir(self.workdir)}/{step} was saved reading the data as "
                                  f"{saved}; this run reads it as {self._legacy_data_layout()} (to resume "
                                  f"exactly, read the data as the saved run did)")
            from oq2vl_jax.data.loader import DataStateMismatch

            try:
                got = ckpt.restore(self.mngr, step, params=self._abstract_params(),
                                   opt_state=self.abstract_state["opt_state"], data_iter=data_iter)
            except DataStateMismatch as e:  # other batch, processes, seed, sources, or files/rows under a path
                raise ConfigError(f"{ckpt.checkpoint_dir(self.workdir)}/{step}: {e} (to resume exactly, "
                                  f"read the data as the saved run did)") from None
            train, frozen = split_params(ckpt.flatten(got[ckpt.PARAMS]), self.cfg)
            state = {"step": jax.device_put(jnp.int32(step), self.shardings["step"]), "params": train,
                     "frozen": frozen, "opt_state": got[ckpt.OPT_STATE]}
            log.info("resumed from %s at step %d", ckpt.checkpoint_dir(self.workdir), step)
            return state, step
        if self.cfg.train.init_from:
            src_step, params = ckpt.load_params(self.cfg.train.init_from, self._abstract_params())
            log.info("initialised from %s (step %d)", self.cfg.train.init_from, src_step)
            return self._with_fresh_opt(ckpt.flatten(params)), 0
        model = build_sharded(self.cfg.model, self.mesh, seed=self.cfg.train.seed)
        return self._with_fresh_opt(flat_params(model)), 0

    def _legacy_data_layout(self) -> dict:
        """The data layout as checkpoints before the iterator-state layout recorded it (meta "data")."""
        d = self.cfg.data
        return {"micro_batch_rows": d.global_batch_size // self.cfg.train.micro_batches,
                "process_count": jax.process_count(), "sources": [s.path for s in d.sources],
                "weights": [s.weight for s in d.sources], "seed": d.seed, "num_workers": d.num_workers}

    def save(self, state: dict, step: int, data_iter) -> None:
        meta = {"step": step, "seed": self.cfg.train.seed}
        ckpt.save(self.mngr, step, params=all_params(state), opt_state=state["opt_state"], meta=meta,
                  data_iter=data_iter)

    # ----- eval ------------------------------------------------------------------------------------
    def evaluate(self, state: dict) -> dict:
        from oq2vl_jax.data.loader import make_eval_iterator

        cfg = self.cfg
        rows = self.rows_per_process // cfg.train.micro_batches
        it = make_eval_iterator(loader_config(cfg, rows, [(cfg.data.eval_source, 1.0)], shuffle=False))
        example = None
        total, count = 0.0, 0.0
        for i, local in enumerate(it):
            if i >= cfg.train.eval_batches:
                break
            if example is None:
                example = batch_shardings(self.mesh, {k: np.asarray(local[k]) for k in MODEL_KEYS if k in local}, False)
            out = jax.device_get(self.eval_step(state, to_global(local, example, None)))
            total, count = total + float(out["loss_sum"]), count + float(out["target_tokens"])
        return {"loss": total / max(count, 1.0), "target_tokens": count}


def run(cfg: Config, workdir: str, stop_at: int | None = None) -> dict:
    """Trains to cfg.train.steps (or until SIGTERM, or for `stop_at` more steps in a time-boxed job:
    saves and returns there, the schedule unchanged); returns the last logged metrics."""
    from oq2vl_jax.data.loader import check_sources, make_train_iterator

    if not cfg.data.sources:
        raise ConfigError("data.sources is empty: nothing to train on")
    if cfg.train.eval_every and not cfg.data.eval_source:
        raise ConfigError(f"train.eval_every={cfg.train.eval_every} needs data.eval_source (or eval_every: 0)")
    cfg = resolve_steps(cfg)
    check_schedule(cfg)
    os.makedirs(workdir, exist_ok=True)
    main_process = jax.process_index() == 0
    check_tokenizer(cfg)
    check_segments(cfg)

    trainer = Trainer(cfg, workdir)
    sources = [(s.path, s.weight) for s in cfg.data.sources]
    # The loader yields one micro-batch at a time (bounded host memory: a whole step of 256 rows x 27
    # images would be gigabytes); a step stacks `micro_batches` of them.
    micro = cfg.train.micro_batches
    try:
        data_iter = make_train_iterator(loader_config(cfg, trainer.rows_per_process // micro, sources, shuffle=True))
        if cfg.train.eval_every:  # read only at the first eval: a bad one must fail now, not hours in
            check_sources(loader_config(cfg, 1, [(cfg.data.eval_source, 1.0)], shuffle=False))
    except ValueError as e:  # packed data that disagree with the config (image tokens, seq_len, mode, ...)
        raise ConfigError(str(e)) from None
    state, step = trainer.initial_state(data_iter)
    # Only now: a resume refused above must not replace the config its checkpoints were made with.
    if main_process:
        with open(os.path.join(workdir, ckpt.CONFIG_FILE), "w") as f:
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    start_step = step
    total_steps = cfg.train.steps
    logger = MetricsLogger(workdir, total_steps, step, enabled=main_process)

    stop = {"signal": None}

    def on_sigterm(signum, _frame):
        stop["signal"] = signum  # finish the step in flight, save, exit

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    n_dev = jax.device_count()
    shardings = None
    last, window_tokens, window_flops, window_start = {}, 0.0, 0.0, time.perf_counter()
    window_wait = 0.0  # host seconds blocked on the loader: near 0 unless the data cannot keep up
    corrupt_total = 0
    profile = cfg.train.profile_steps
    tracing = False

    def check(step_done: int, metrics: dict) -> dict:
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not np.isfinite(host["loss"]) or not np.isfinite(host["grad_norm"]):
            raise NonFiniteLoss(f"non-finite loss {host['loss']} (grad norm {host['grad_norm']}) at step "
                                f"{step_done}; the last good checkpoint is step {trainer.mngr.latest_step()}")
        return host

    # Metrics of a step are read back ("settled") once the next step is dispatched, so the device
    # never waits on the host; a step is settled before anything is logged, evaluated or saved after
    # it, so a non-finite loss never reaches a checkpoint.
    pending: list[tuple[int, dict, int]] = []

    def settle() -> None:
        nonlocal last, window_tokens, window_flops, window_start, window_wait
        for s, metrics, n_images in pending:
            host = check(s, metrics)
            logger.advance()
            window_tokens += host["tokens"]
            window_flops += train_step_flops(cfg.model, cfg.data.global_batch_size, cfg.data.seq_len, n_images,
                                             vision_trained=trainer.vision_trained,
                                             patch_row=cfg.data.max_patches or 4 * cfg.data.seq_len)
            if s % cfg.train.log_every == 0 or s == total_steps:
                elapsed = time.perf_counter() - window_start
                host["tokens_per_s"] = window_tokens / elapsed
                host["mfu"] = window_flops / elapsed / (n_dev * cfg.train.peak_tflops * 1e12)
                host["data_wait"] = window_wait / elapsed  # fraction of wall time spent waiting for batches
                logger.log(s, host)
                last = host
                window_tokens, window_flops, window_start, window_wait = 0.0, 0.0, time.perf_counter(), 0.0
        pending.clear()

    try:
        while step < total_steps:
            if profile and step + 1 == profile[0]:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
                tracing = True
            t_wait = time.perf_counter()
            parts = [next(data_iter) for _ in range(micro)]  # host work overlaps the step in flight
            window_wait += time.perf_counter() - t_wait
            local = parts[0] if micro == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            corrupt = int(np.sum(local.get("corrupt", 0)))
            if corrupt:  # damaged records/images: padding / masked out by the loader, counted here
                corrupt_total += corrupt
                log.warning("step %d: %d damaged record(s)/image(s) in this process's data, skipped "
                            "(%d so far)", step + 1, corrupt, corrupt_total)
            if shardings is None:
                example = {k: np.asarray(local[k]) for k in MODEL_KEYS if k in local}
                example = {k: v.reshape((micro, v.shape[0] // micro) + v.shape[1:]) for k, v in example.items()}
                shardings = batch_shardings(trainer.mesh, example, True)
            if (cfg.model.attention == "cudnn" and jax.process_count() == 1
                    and int(local["segment_ids"].max()) > cfg.model.max_segments):  # sources without stats
                raise ConfigError(f"a row holds {int(local['segment_ids'].max())} samples > model.max_segments="
                                  f"{cfg.model.max_segments}; raise it or pack fewer samples per row")
            batch = to_global(local, shardings, micro)
            n_images = int(np.asarray(local["image_mask"]).sum()) * jax.process_count()
            if "patch_segment_ids" in local:  # qwen2_vl: the tower's work is in patches, not images
                n_images = int(np.count_nonzero(local["patch_segment_ids"])) * jax.process_count()
            state, metrics = trainer.train_step(state, batch)
            step += 1
            settle()  # the previous step
            pending.append((step, metrics, n_images))
            by_signal = agreed(bool(stop["signal"]))  # SIGTERM on any host stops all at this step
            halt = by_signal or (stop_at is not None and step - start_step >= stop_at)
            evaluate = bool(cfg.train.eval_every and step % cfg.train.eval_every == 0)
            save = step % cfg.train.checkpoint_every == 0 or step == total_steps or halt
            if save or evaluate or halt or step % cfg.train.log_every == 0 or (tracing and step == profile[1]):
                settle()  # this step
            if tracing and step == profile[1]:  # settled: its device work is inside the trace
                jax.profiler.stop_trace()
                tracing = False
                log.info("profile of steps %d-%d written to %s", *profile, os.path.join(workdir, "profile"))
            if save:  # before eval: an eval that fails must not cost the checkpoint
                trainer.save(state, step, data_iter)
            if evaluate:
                logger.log(step, trainer.evaluate(state), prefix="eval_")
            if halt:
                log.warning("stopping at step %d (%s), checkpoint saved", step, "SIGTERM" if by_signal else "--stop-at")
                break
    finally:
        if tracing:
            jax.profiler.stop_trace()
        trainer.mngr.wait_until_finished()
        trainer.mngr.close()
        logger.close()
        signal.signal(signal.SIGTERM, previous)
    return last


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m oq2vl_jax.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny.yaml")
    p.add_argument("--workdir", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="save and exit after this many more steps (time-boxed jobs); the same command resumes")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", action="extend",
                   help="config overrides, e.g. --set optim.lr=3e-5 train.steps=100")
    return p.parse_args(argv)


def main(argv=None) -> int:
    # Our own handler: absl (pulled in by orbax/grain) may have claimed the root logger already.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    pkg_log = logging.getLogger("oq2vl_jax")
    pkg_log.addHandler(handler)
    pkg_log.setLevel(logging.INFO)
    pkg_log.propagate = False
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    init_distributed()
    workdir = args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    try:
        run(cfg, workdir, stop_at=args.stop_at)
    except (ConfigError, FileNotFoundError, ckpt.CheckpointMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        log.error("%s", e)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
