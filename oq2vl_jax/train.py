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

import contextlib
import logging
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from oq2vl_jax import checkpoint as ckpt
from oq2vl_jax import cli, failures, integrity, locks, memory, resolve
from oq2vl_jax.config import Config, ConfigError
from oq2vl_jax.flops import peak_flops_per_device, train_step_flops
from oq2vl_jax.metrics import MetricsLogger, clean_for_resume
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


def loader_config(cfg: Config, rows_per_process: int, sources, shuffle: bool):
    from oq2vl_jax.data.loader import LoaderConfig

    qwen2_vl = cfg.model.arch == "qwen2_vl"
    return LoaderConfig(
        sources=tuple(sources), batch_size=rows_per_process, seq_len=cfg.data.seq_len,
        max_images=cfg.data.max_images, image_size=cfg.model.vision.image_size, seed=cfg.data.seed,
        num_workers=cfg.data.num_workers, shuffle=shuffle, mode=cfg.data.mode, image_dtype=cfg.data.image_dtype,
        image_tokens=cfg.model.image_tokens, sampler=cfg.data.sampler, group_rows=cfg.train.loss_group_rows,
        qwen2_vl=cfg.model.qwen2_vl_vision if qwen2_vl else None,
        max_patches=(cfg.data.max_patches or 4 * cfg.data.seq_len) if qwen2_vl else 0,
        image_token_id=cfg.model.image_token_id,
    )


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
    """Owns the mesh, the jitted steps, the state and the checkpoint manager of one run. Takes a
    resolved config (resolve.for_train): every check has been made there."""

    def __init__(self, cfg: Config, workdir: str, devices=None):
        """devices: the mesh's devices (default: all); bench/gpu_aot.py passes a GPU topology's
        devices to compile the steps ahead of time on a machine without that GPU."""
        self.cfg, self.workdir = cfg, workdir
        self.rows_per_process = cfg.data.global_batch_size // jax.process_count()
        self.mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
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
        self._compiled_step = None
        self._batch_shardings = None
        self.manifests = integrity.Manifests(ckpt.checkpoint_dir(workdir), cfg.train.async_checkpointing,
                                             jax.process_index() == 0)
        self.mngr = ckpt.make_manager(workdir, keep_last=cfg.train.keep_last, keep_every=cfg.train.keep_every,
                                      async_save=cfg.train.async_checkpointing,
                                      on_finalized=self.manifests.on_finalized)

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

    def step(self, state: dict, batch: dict):
        """One optimiser step. Compiled at the first call, and refused by name (memory.OutOfMemory)
        if the compiled step needs more memory than the device has."""
        if self._compiled_step is None:
            compiled = self.train_step.lower(state, batch).compile()
            memory.check_fits(compiled, self.cfg)
            self._compiled_step = compiled
        return self._compiled_step(state, batch)

    # ----- state -----------------------------------------------------------------------------------
    def _abstract_params(self) -> dict:
        """Restore target for the `params` item: all parameters, with their shardings."""
        return all_params(self.abstract_state)

    def _with_fresh_opt(self, flat: dict) -> dict:
        train, frozen = split_params(flat, self.cfg)
        with use_mesh(self.mesh):
            opt_state = jax.jit(self.tx.init, out_shardings=self.shardings["opt_state"])(train)
        state = {"step": jnp.zeros((), jnp.int32), "params": train, "frozen": frozen, "opt_state": opt_state}
        return jax.device_put(state, self.shardings)  # exactly the compiled step's input shardings

    def initial_state(self, data_iter) -> tuple[dict, int]:
        """(state, step): the latest checkpoint in the workdir, else init_from, else random."""
        step = integrity.resume_step(self.mngr, self.workdir)  # damaged/incomplete newer steps moved aside
        if step is not None:
            from oq2vl_jax.data.loader import DataStateMismatch

            ckpt.check_saved_params(self.workdir, step, self._abstract_params())
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

    def save(self, state: dict, step: int, data_iter) -> None:
        meta = {"step": step, "seed": self.cfg.train.seed}
        self.manifests.before_save(step)
        ckpt.save(self.mngr, step, params=all_params(state), opt_state=state["opt_state"], meta=meta,
                  data_iter=data_iter)
        self.manifests.after_save(step)

    # ----- data ------------------------------------------------------------------------------------
    def train_iterator(self):
        """The endless, checkpointable train stream, one micro-batch of rows per next()."""
        from oq2vl_jax.data.loader import check_sources, make_train_iterator

        cfg = self.cfg
        rows = self.rows_per_process // cfg.train.micro_batches
        try:
            it = make_train_iterator(loader_config(cfg, rows, [(s.path, s.weight) for s in cfg.data.sources], True))
            if cfg.train.eval_every:  # read only at the first eval: a bad one must fail now, not hours in
                check_sources(loader_config(cfg, 1, [(cfg.data.eval_source, 1.0)], shuffle=False))
        except ValueError as e:  # packed data that disagree with the config (sources without stats)
            raise ConfigError(str(e)) from None
        return it

    def next_batch(self, data_iter) -> tuple[dict, int, int]:
        """(global batch [micro, rows, ...], images in it, damaged records skipped) for one step."""
        micro = self.cfg.train.micro_batches
        parts = [next(data_iter) for _ in range(micro)]  # host work overlaps the step in flight
        local = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if self._batch_shardings is None:
            example = {k: np.asarray(local[k]) for k in MODEL_KEYS if k in local}
            example = {k: v.reshape((micro, v.shape[0] // micro) + v.shape[1:]) for k, v in example.items()}
            self._batch_shardings = batch_shardings(self.mesh, example, True)
        m = self.cfg.model
        if m.attention == "cudnn" and int(local["segment_ids"].max()) > m.segments:  # sources without stats
            raise ConfigError(f"a row holds {int(local['segment_ids'].max())} samples > model.max_segments="
                              f"{m.segments}; raise it or pack fewer samples per row")
        n_images = int(np.asarray(local["image_mask"]).sum()) * jax.process_count()
        if "patch_segment_ids" in local:  # qwen2_vl: the tower's work is counted in patches (flops.py)
            n_images = int(np.count_nonzero(local["patch_segment_ids"])) * jax.process_count()
        return to_global(local, self._batch_shardings, micro), n_images, int(np.sum(local.get("corrupt", 0)))

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


class StepLog:
    """Reads back each step's metrics one step late (so the device never waits on the host), stops on
    a non-finite loss, and logs tokens/s, MFU and data_wait every log_every steps."""

    def __init__(self, trainer: Trainer, logger: MetricsLogger):
        self.trainer, self.logger, self.cfg = trainer, logger, trainer.cfg
        self.peak = peak_flops_per_device(jax.devices()[0].device_kind, self.cfg.train.peak_tflops)
        self.pending: list[tuple[int, dict, int]] = []
        self.last: dict = {}
        self.wait = 0.0  # host seconds blocked on the loader: near 0 unless the data cannot keep up
        self._reset()

    def _reset(self):
        self.tokens, self.flops, self.wait, self.start = 0.0, 0.0, 0.0, time.perf_counter()

    def push(self, step: int, metrics: dict, n_images: int) -> None:
        self.pending.append((step, metrics, n_images))

    def settle(self) -> None:
        cfg = self.cfg
        for step, metrics, n_images in self.pending:
            host = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not np.isfinite(host["loss"]) or not np.isfinite(host["grad_norm"]):
                raise NonFiniteLoss(f"non-finite loss {host['loss']} (grad norm {host['grad_norm']}) at step "
                                    f"{step}; the last good checkpoint is step {self.trainer.mngr.latest_step()}")
            self.logger.advance()
            self.tokens += host["tokens"]
            self.flops += train_step_flops(cfg.model, cfg.data.global_batch_size, cfg.data.seq_len, n_images,
                                           vision_trained=self.trainer.vision_trained,
                                           patch_row=cfg.data.max_patches or 4 * cfg.data.seq_len)
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                elapsed = time.perf_counter() - self.start
                host["tokens_per_s"] = self.tokens / elapsed
                host["mfu"] = self.flops / elapsed / (jax.device_count() * self.peak) if self.peak else None
                host["data_wait"] = self.wait / elapsed  # fraction of wall time spent waiting for batches
                self.logger.log(step, host)
                self.last = host
                self._reset()
        self.pending.clear()


@contextlib.contextmanager
def stop_signals():
    """SIGTERM or Ctrl-C (SIGINT): finish the step in flight, save, exit (the returned dict's "signal"
    is set). A second Ctrl-C stops at once, without the save."""
    stop = {"signal": None}

    def on_signal(signum, _frame):
        if signum == signal.SIGINT and stop["signal"] == signal.SIGINT:
            raise KeyboardInterrupt
        stop["signal"] = signum

    previous = signal.signal(signal.SIGTERM, on_signal)
    previous_int = signal.signal(signal.SIGINT, on_signal)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def run(cfg: Config, workdir: str, stop_at: int | None = None) -> dict:
    """Trains to cfg.train.steps (or until SIGTERM/SIGINT, or for `stop_at` more steps in a time-boxed
    job: saves and returns there, the schedule unchanged); returns the last logged metrics.
    The workdir is locked for the run: a second trainer on it is refused, naming this one."""
    with failures.writing(workdir):
        os.makedirs(workdir, exist_ok=True)
        with locks.hold(workdir, "a training run") if jax.process_index() == 0 else contextlib.nullcontext():
            return _run(cfg, workdir, stop_at)


def _run(cfg: Config, workdir: str, stop_at: int | None) -> dict:
    cfg = resolve.for_train(cfg, jax.process_count(), jax.device_count())
    trainer = Trainer(cfg, workdir)
    t, profile = cfg.train, cfg.train.profile_steps
    tracing = False
    with use_mesh(trainer.mesh), stop_signals() as stop, memory.named_oom(cfg):
        data_iter = trainer.train_iterator()
        state, step = trainer.initial_state(data_iter)
        if jax.process_index() == 0:  # one clean series: a cut-off line and records after `step` go
            aside = clean_for_resume(workdir, step)
            if aside:
                log.warning("metrics.jsonl trimmed to step %d for the resume; the previous file is %s", step, aside)
        if jax.process_index() == 0:  # only now: a refused resume keeps the config its checkpoints had
            ckpt.save_config(workdir, cfg)
        start_step = step
        logger = MetricsLogger(workdir, t.steps, step, enabled=jax.process_index() == 0)
        steps = StepLog(trainer, logger)
        try:
            while step < t.steps:
                if profile and step + 1 == profile[0]:
                    jax.profiler.start_trace(os.path.join(workdir, "profile"))
                    tracing = True
                t_wait = time.perf_counter()
                batch, n_images, corrupt = trainer.next_batch(data_iter)
                steps.wait += time.perf_counter() - t_wait
                if corrupt:  # damaged records/images: padding / masked out by the loader
                    log.warning("step %d: %d damaged record(s)/image(s) skipped", step + 1, corrupt)
                state, metrics = trainer.step(state, batch)
                step += 1
                steps.settle()  # the previous step
                steps.push(step, metrics, n_images)
                by_signal = agreed(bool(stop["signal"]))  # SIGTERM on any host stops all at this step
                halt = by_signal or (stop_at is not None and step - start_step >= stop_at)
                evaluate = bool(t.eval_every and step % t.eval_every == 0)
                save = step % t.checkpoint_every == 0 or step == t.steps or halt
                if save or evaluate or halt or step % t.log_every == 0 or (tracing and step == profile[1]):
                    steps.settle()  # this step: a non-finite loss never reaches a checkpoint
                if tracing and step == profile[1]:  # settled: its device work is inside the trace
                    jax.profiler.stop_trace()
                    tracing = False
                    log.info("profile of steps %d-%d written to %s", *profile, os.path.join(workdir, "profile"))
                if save:  # before eval: an eval that fails must not cost the checkpoint
                    trainer.save(state, step, data_iter)
                if evaluate:
                    logger.log(step, trainer.evaluate(state), prefix="eval_")
                if halt:
                    why = signal.Signals(stop["signal"]).name if stop["signal"] else "another host's signal"
                    log.warning("stopping at step %d (%s), checkpoint saved", step, why if by_signal else "--stop-at")
                    break
        finally:
            if tracing:
                jax.profiler.stop_trace()
            trainer.mngr.wait_until_finished()
            trainer.mngr.close()
            logger.close()
    return steps.last


def main(argv=None) -> int:
    p = cli.parser("python -m oq2vl_jax.train", __doc__)
    cli.add_config(p)
    p.add_argument("--workdir", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="save and exit after this many more steps (time-boxed jobs); the same command resumes")
    args = p.parse_args(argv)

    def body():
        cfg = cli.load_config(args)
        # jax's GPU memory pool defaults to 75% of the device; the configs are sized to leave 10% free
        # (bench/gpu_aot.py), so the pool takes 90% unless the user set it. Read when the backend starts.
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")
        init_distributed()
        workdir = args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
        try:
            run(cfg, workdir, stop_at=args.stop_at)
        except NonFiniteLoss as e:
            log.error("%s", e)
            return 3
        return 0

    return cli.run(body, args)


if __name__ == "__main__":
    sys.exit(main())
