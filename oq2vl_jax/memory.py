"""Out-of-memory named before it happens: the compiled step's memory against the device's, and the
config knobs that lower it in the message (exit 2), also when XLA runs out at run time."""

from __future__ import annotations

import contextlib

import jax

from oq2vl_jax.cli import UserError

GiB = 1024**3


class OutOfMemory(UserError):
    """A step does not fit the device's memory; the message names the knobs that fix it."""


def device_memory_bytes() -> int | None:
    """Memory of one local device (None where jax does not report it, e.g. on CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def compiled_bytes(compiled) -> int | None:
    """Per-device bytes a compiled executable needs: arguments + outputs + temporaries, less the
    donated buffers its outputs reuse (or XLA's reported peak, if larger)."""
    ma = compiled.memory_analysis()
    if ma is None:
        return None
    total = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
             - ma.alias_size_in_bytes + ma.generated_code_size_in_bytes)
    # XLA's heap-simulated peak where jax reports it: equal to the sum on GPU compiles seen so far,
    # lower on CPU ones (which do not model donation the same way); the larger one is kept.
    return max(total, getattr(ma, "peak_memory_in_bytes", 0) or 0)


def advice(cfg) -> str:
    m, t = cfg.model, cfg.train
    rows = cfg.data.global_batch_size // t.micro_batches
    return (f"lower it with train.micro_batches (now {t.micro_batches}: {rows} rows per micro-batch; more "
            f"means smaller), model.remat (now {m.remat}; 'full' keeps the least), model.loss_chunk_size (now "
            f"{m.loss_chunk_size}; smaller holds fewer float32 logits), model.vision_chunk_size (now "
            f"{m.vision_chunk_size}; e.g. 8 runs the tower on 8 image slots at a time)")


def check_fits(compiled, cfg, what: str = "the train step", limit: int | None = None) -> None:
    """Raises OutOfMemory when the compiled step needs more than the device has."""
    limit = device_memory_bytes() if limit is None else limit
    need = compiled_bytes(compiled)
    if limit is None or need is None or need <= limit:
        return
    raise OutOfMemory(f"{what} needs {need / GiB:.2f} GiB per device, the device has {limit / GiB:.2f} GiB: "
                      + advice(cfg))


def is_oom(e: BaseException) -> bool:
    return isinstance(e, (jax.errors.JaxRuntimeError, RuntimeError)) and "RESOURCE_EXHAUSTED" in str(e)


@contextlib.contextmanager
def named_oom(cfg, what: str = "training"):
    """Turns XLA's RESOURCE_EXHAUSTED into OutOfMemory with the knobs (exit 2, no traceback)."""
    try:
        yield
    except Exception as e:
        if not is_oom(e):
            raise
        first = str(e).strip().split("\n")[0][:300]
        raise OutOfMemory(f"{what} ran out of device memory ({first}): {advice(cfg)}") from None
