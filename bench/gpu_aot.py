"""Compile the full-size steps for a GPU ahead of time, on a machine without one, and report what XLA
made of them: per-device memory against the device's, cuDNN attention calls against the model's,
dense-mask attention, collectives, fusions, and a roofline step time (predicted, not measured).

    python bench/gpu_aot.py --config configs/pretrain.yaml --gpu h100 --topology 1x1x8

Needs jax's CUDA plugin (`pip install -e . "jax[cuda12]"`, Python 3.12; no GPU, no CUDA driver):
the topology's devices stand in for the GPUs and XLA's GPU compiler runs on the CPU. jax asks the
local device for its compute capability while tracing cuDNN attention; here those questions are
answered for the target GPU. What is counted and how the roofline is made: docs/gpu_aot.md.

Steps: `train` (the configured train step: micro-batches, remat, mesh, shardings and donation as
`python -m oq2vl_jax.train` compiles it, on rows packed like the real data), `prefill` and `decode`
(generation on one device, as `python -m oq2vl_jax.eval` runs it per device).
"""

from __future__ import annotations

import os

# Before jax is imported: no GPU is looked for, and the CUDA plugin loads without one.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import hlo_stats  # noqa: E402

from oq2vl_jax import memory  # noqa: E402
from oq2vl_jax.flops import peak_flops_per_device  # noqa: E402

GiB = 2**30
STEPS = ("train", "prefill", "decode")


@dataclasses.dataclass(frozen=True)
class Gpu:
    spec: str  # XLA target-config text file in bench/gpu_targets/
    link_gbps: float  # NVLink collective bandwidth per GPU, one direction (GB/s)
    network_gbps: float  # inter-node bandwidth per GPU (one 400 Gb/s NIC per GPU), GB/s

    @functools.cached_property
    def target_config(self) -> str:
        with open(os.path.join(HERE, "gpu_targets", self.spec)) as f:
            return f.read()

    def field(self, name: str) -> float:
        return float(re.search(rf"\b{name}: ([\d.]+)", self.target_config).group(1))

    @property
    def kind(self) -> str:
        return re.search(r'device_description_str: "([^"]+)"', self.target_config).group(1)

    @property
    def capability(self) -> tuple[int, int]:
        cc = re.search(r"cuda_compute_capability \{\s*major: (\d+)\s*minor: (\d+)", self.target_config)
        return int(cc.group(1)), int(cc.group(2))


GPUS = {
    "h100": Gpu("h100.txtpb", link_gbps=450, network_gbps=50),  # NVLink 4: 900 GB/s both ways
    "h200": Gpu("h200.txtpb", link_gbps=450, network_gbps=50),
    "a100": Gpu("a100.txtpb", link_gbps=300, network_gbps=25),  # NVLink 3, 200 Gb/s NICs
}


class AotError(Exception):
    """Bad input or a missing install, said in one line (exit 2)."""


# ----- the target -------------------------------------------------------------------------------------

def topology_devices(gpu: Gpu, topology: str):
    from jax.experimental import topologies

    if not re.fullmatch(r"\d+x\d+x\d+", topology):
        raise AotError(f"--topology {topology!r}: expected SLICESxHOSTSxGPUS_PER_HOST, e.g. 1x1x8")
    try:
        topo = topologies.get_topology_desc("aot", "cuda", target_config=gpu.target_config, topology=topology)
    except Exception as e:  # noqa: BLE001 - the plugin's errors are plain RuntimeErrors
        raise AotError(f"no CUDA topology ({str(e).splitlines()[0][:200]}): install jax's CUDA plugin "
                       f"(pip install 'jax[cuda12]', Python 3.12)") from None
    return list(topo.devices)


@contextlib.contextmanager
def answering_for(gpu: Gpu):
    """jax's cuDNN attention asks the local device (here a CPU) for its compute capability and cuDNN
    version while tracing; this answers for the target GPU. Our own check (models.attention) too.
    Dense-mask (XLA) attention is recorded as it is traced."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    import oq2vl_jax.models.attention as attn
    import oq2vl_jax.models.qwen2 as qwen2

    cc = gpu.capability
    parse = lambda c: tuple(int(x) for x in c.split("."))  # noqa: E731
    dense = collections.Counter()
    real_xla = attn.xla_attention

    def recording(q, k, v, mask, scale):
        dense[("dense mask" if mask is not None else "XLA, no mask", tuple(q.shape), tuple(k.shape))] += 1
        return real_xla(q, k, v, mask, scale)

    patches = [(fa, "check_cudnn_version", lambda: 90700),
               (fa, "check_compute_capability", lambda c: cc >= parse(c)),
               (fa, "is_cuda_compute_capability_equal", lambda c: cc == parse(c)),
               (attn, "_backend", lambda: "gpu"), (attn, "_gpu_capability", lambda: cc),
               (attn, "xla_attention", recording), (qwen2, "xla_attention", recording)]
    saved = [(m, n, getattr(m, n)) for m, n, _ in patches]
    for m, n, v in patches:
        setattr(m, n, v)
    attn._cudnn_unavailable_reason.cache_clear()
    try:
        yield dense
    finally:
        for m, n, v in saved:
            setattr(m, n, v)
        attn._cudnn_unavailable_reason.cache_clear()


# ----- the steps --------------------------------------------------------------------------------------

def _train_bench():
    spec = importlib.util.spec_from_file_location("train_bench", os.path.join(HERE, "train_bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def train_batch_specs(cfg, mesh, images_per_row: int, grid: tuple[int, int]) -> dict:
    """Abstract [micro_batches, rows, ...] batch of rows packed like the real data (bench/train_bench.py)."""
    from oq2vl_jax.train_step import MODEL_KEYS, batch_shardings

    bench = _train_bench()
    one = (bench.synthetic_rows_qwen2_vl(cfg, 1, images_per_row, grid) if cfg.model.arch == "qwen2_vl"
           else bench.synthetic_rows(cfg, 1, images_per_row))
    rows = cfg.data.global_batch_size // cfg.train.micro_batches
    dtypes = {k: v.dtype for k, v in one.items()}
    if "images" in dtypes and cfg.data.image_dtype == "uint8":
        dtypes["images"] = np.dtype(np.uint8)
    example = {k: jax.ShapeDtypeStruct((cfg.train.micro_batches, rows) + v.shape[1:], dtypes[k])
               for k, v in one.items() if k in MODEL_KEYS}
    shardings = batch_shardings(mesh, example, True)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in example.items()}


def compile_train(cfg, devices, args):
    from oq2vl_jax.flops import train_step_flops
    from oq2vl_jax.train import Trainer

    rows, t = cfg.data.global_batch_size, cfg.data.seq_len
    images = min(args.images_per_row, cfg.data.max_images)
    g = args.image_grid
    if cfg.model.arch == "qwen2_vl":  # as many images of the grid as a row's patch budget holds
        images = min(images, (cfg.data.max_patches or 4 * t) // (g[0] * g[1]))
    trainer = Trainer(cfg, tempfile.mkdtemp(prefix="gpu_aot_"), devices=devices)
    try:
        batch = train_batch_specs(cfg, trainer.mesh, images, tuple(g))
        lowered = trainer.train_step.lower(trainer.abstract_state, batch)
    except SystemExit as e:  # bench/train_bench.py's row builders refuse rows that cannot hold the images
        raise AotError(str(e)) from None
    finally:
        trainer.mngr.close()
    units = rows * images * (g[0] * g[1] if cfg.model.arch == "qwen2_vl" else 1)
    flops = train_step_flops(cfg.model, rows, t, units, vision_trained=trainer.vision_trained,
                             patch_row=cfg.data.max_patches or 4 * t)
    return lowered, {"tokens": rows * t, "model_flops": flops,
                     "hosts_of": hosts_of(trainer.mesh)}


def hosts_of(mesh) -> list[int]:
    """The host of each logical device of a program jitted over `mesh` (its device assignment)."""
    return [d.process_index for d in mesh.devices.flat]


def _generation_model(cfg, devices):
    from oq2vl_jax.models import build_abstract
    from oq2vl_jax.sharding import make_mesh

    model_cfg = dataclasses.replace(cfg.model, remat="none")  # as generate.load_checkpoint
    mesh = make_mesh(1, 1, 1, devices=devices[:1])
    graphdef, state = build_abstract(model_cfg, mesh)
    return model_cfg, mesh, graphdef, state


def compile_generation(cfg, devices, args, which: str):
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from oq2vl_jax import generate
    from oq2vl_jax.models.cache import KVCache

    model_cfg, mesh, graphdef, state = _generation_model(cfg, devices)
    whole = NamedSharding(mesh, P())
    b, new = args.gen_batch, args.new_tokens
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=whole)  # noqa: E731

    def run(fn, static):
        def call(st, *a):
            return fn(nnx.merge(graphdef, st), *a, **static)
        return call

    if model_cfg.arch == "qwen2_vl":
        prompt = _qwen2_vl_prompt_batch(model_cfg, b, tuple(args.image_grid), args.prompt_text)
        t = prompt[0].shape[1]
    else:
        t = -(-(model_cfg.image_tokens + args.prompt_text) // 32) * 32  # padded as Generator pads prompts
    if which == "prefill":
        if model_cfg.arch == "qwen2_vl":
            from oq2vl_jax import generate_qwen2_vl

            args_ = tuple(spec(x.shape, x.dtype) for x in prompt)
            lowered = jax.jit(run(generate_qwen2_vl.prefill, {"max_len": t + new})).lower(state, *args_)
            from oq2vl_jax.flops import qwen2_vl_vision_flops

            patches = prompt[3].shape[1]
            flops = 2.0 * b * t * _llm_params(model_cfg) + qwen2_vl_vision_flops(
                model_cfg, b, b * args.image_grid[0] * args.image_grid[1], patches, False)
            return lowered, {"tokens": b * t, "model_flops": flops, "hosts_of": [0]}
        size = model_cfg.vision.image_size
        args_ = (spec((b, t), jnp.int32), spec((b, 1, size, size, 3), jnp.float32), spec((b, t), jnp.int32),
                 spec((b, t), jnp.bool_))
        lowered = jax.jit(run(generate.prefill, {"max_len": t + new})).lower(state, *args_)
        flops = 2.0 * b * t * _llm_params(model_cfg) + b * _vision_flops(model_cfg)
        return lowered, {"tokens": b * t, "model_flops": flops, "hosts_of": [0]}
    cache = jax.eval_shape(lambda: KVCache.init(model_cfg.text, b, t + new, jnp.dtype(model_cfg.dtype)))
    cache = jax.tree.map(lambda a: spec(a.shape, a.dtype), cache)
    lowered = jax.jit(run(generate.decode_step, {}), donate_argnums=(1,)).lower(
        state, cache, spec((b,), jnp.int32), spec((b,), jnp.int32))
    return lowered, {"tokens": b, "model_flops": 2.0 * b * _llm_params(model_cfg), "hosts_of": [0]}


def _qwen2_vl_prompt_batch(model_cfg, b: int, grid: tuple[int, int], text: int) -> tuple:
    """(ids, positions, valid, patches, patch segment ids, patch positions) of b prompts of one image of
    `grid` patches and `text` text tokens, padded as Qwen2VLGenerator pads them."""
    from oq2vl_jax.generate_qwen2_vl import Qwen2VLPrompt, pad_batch

    v = model_cfg.qwen2_vl_vision
    k = grid[0] * grid[1] // v.spatial_merge_size**2
    ids = ([model_cfg.vision_start_token_id] + [model_cfg.image_token_id] * k + [model_cfg.vision_end_token_id]
           + [3] * text)
    image = (np.zeros((grid[0] * grid[1], v.patch_dim), np.float32), grid)
    ids_, valid, positions, _, patches, pseg, ppos = pad_batch(
        [Qwen2VLPrompt(ids, [image])] * b, b, pad_id=0, image_token_id=model_cfg.image_token_id,
        patch_dim=v.patch_dim, merge=v.spatial_merge_size, multiple=32)
    return ids_, positions, valid, patches, pseg, ppos


def _llm_params(model_cfg) -> float:
    from oq2vl_jax.flops import llm_matmul_params
    return float(llm_matmul_params(model_cfg))


def _vision_flops(model_cfg) -> float:
    from oq2vl_jax.flops import projector_flops_per_image, vision_forward_flops_per_image
    return vision_forward_flops_per_image(model_cfg) + projector_flops_per_image(model_cfg)


def expected_attention(cfg, step: str, devices: int, gen_batch: int) -> dict:
    """cuDNN attention custom calls the model should produce per run of the step (per device): the
    LLM's layers (train: forward, again when remat recomputes it, and backward) and the SigLIP tower's
    layers once per chunk of image slots (forward only: frozen, or at 729 patches the backward is
    XLA's). Generation's cached attention is XLA's with a mask, by design; Qwen2-VL's packed patch
    rows have no cuDNN path."""
    import oq2vl_jax.models.attention as attn

    m = cfg.model
    if m.attention != "cudnn" or step == "decode":
        return {"forward": 0, "backward": 0}
    fwd = bwd = 0
    micro = cfg.train.micro_batches if step == "train" else 1
    # The model's own rule (dtype, packed layout and compute capability), answered for the target.
    llm = attn._cudnn_unavailable_reason(jnp.dtype(m.dtype).name, not m.cross_segment_attention) is None
    tower = attn._cudnn_unavailable_reason(jnp.dtype(m.vision_dtype).name, False) is None
    if step == "train" and llm:
        layers = m.text.num_hidden_layers
        fwd, bwd = layers * (2 if m.remat != "none" else 1), layers
    if m.arch == "oq2vl" and tower:
        slots = (cfg.data.global_batch_size // micro // devices * cfg.data.max_images if step == "train"
                 else gen_batch)
        fwd += m.vision.num_layers_run() * (-(-slots // min(m.vision_chunk_size, slots)) if m.vision_chunk_size else 1)
    return {"forward": fwd * micro, "backward": bwd * micro}


# ----- report -----------------------------------------------------------------------------------------

def report(step: str, lowered, info: dict, dense: collections.Counter, cfg, gpu: Gpu, n_dev: int, hosts: int,
           margin: float) -> dict:
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    total = memory.compiled_bytes(compiled)  # what the train job checks before its first step
    capacity = gpu.field("device_memory_size")
    prog = hlo_stats.analyse(compiled.as_text(), n_dev)
    dev = hlo_stats.Device(peak_flops_per_device(gpu.kind), gpu.field("memory_bandwidth"), gpu.link_gbps * 1e9,
                           gpu.network_gbps * 1e9)
    hlo_stats.mark_hosts(prog, info["hosts_of"])
    hlo_stats.overlap_windows(prog, dev)
    roof = hlo_stats.roofline(prog, dev)
    calls = prog.custom_calls(hlo_stats.CUDNN_ATTENTION)
    n_fusions, fusion_launches = prog.fusions
    per_device_tokens = info["tokens"] / (n_dev if step == "train" else 1)
    per_device_flops = info["model_flops"] / (n_dev if step == "train" else 1)
    colls = collections.defaultdict(lambda: {"count": 0.0, "gb": 0.0, "across_nodes_gb": 0.0, "s": 0.0,
                                             "exposed_s": 0.0, "async": 0.0})
    for c in prog.collectives:
        e = colls[c.kind]
        e["count"] += c.count
        e["gb"] += c.bytes * c.count / 1e9
        e["s"] += hlo_stats.collective_time(c, dev) * c.count
        e["exposed_s"] += hlo_stats.exposed_time(c, dev) * c.count
        e["async"] += 0 if c.sync else c.count
        e["across_nodes_gb"] += c.bytes * c.count / 1e9 if c.crosses_hosts else 0.0
    return {
        "step": step, "gpu": gpu.kind, "devices": n_dev, "hosts": hosts, "compile_s": round(compile_s, 1),
        "memory_gib": {"arguments": ma.argument_size_in_bytes / GiB, "outputs": ma.output_size_in_bytes / GiB,
                       "aliased": ma.alias_size_in_bytes / GiB, "temporaries": ma.temp_size_in_bytes / GiB,
                       "total": total / GiB, "device": capacity / GiB},
        "fits": total <= capacity * (1 - margin), "margin": margin,
        "cudnn_attention": {"forward": calls.get("__cudnn$fmhaSoftmax", 0),
                            "backward": calls.get("__cudnn$fmhaSoftmaxBackward", 0),
                            "other": {k: v for k, v in calls.items() if k not in ("__cudnn$fmhaSoftmax",
                                                                                  "__cudnn$fmhaSoftmaxBackward")}},
        "cudnn_attention_expected": info["expected"],
        "xla_attention": [{"kind": k, "q": list(q), "kv": list(kv), "traced": n} for (k, q, kv), n in dense.items()],
        "collectives": {k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in sorted(colls.items())},
        "fusions": n_fusions, "fusion_launches": fusion_launches, "unknown_trip_counts": prog.unknown_trip_counts,
        "roofline": {"compute_s": roof["compute_s"], "collective_s": roof["collective_s"],
                     "exposed_collective_s": roof["exposed_collective_s"], "step_s": roof["step_s"],
                     "hlo_tflop": roof["flops"] / 1e12, "f32_tflop": roof["f32_flops"] / 1e12,
                     "hbm_gb": roof["hbm_bytes"] / 1e9, "compute_by_category_s": roof["compute_by_category_s"],
                     "tokens_per_s_per_device": per_device_tokens / roof["step_s"],
                     "mfu_upper_bound": per_device_flops / roof["step_s"] / dev.peak_flops},
        "link_gbps": gpu.link_gbps, "network_gbps": gpu.network_gbps,
    }


def print_report(r: dict, cfg_name: str) -> None:
    m, roof = r["memory_gib"], r["roofline"]
    exp, got = r["cudnn_attention_expected"], r["cudnn_attention"]
    ok = "ok" if (got["forward"], got["backward"]) == (exp["forward"], exp["backward"]) else "MISMATCH"
    print(f"\n== {cfg_name}: {r['step']} on {r['devices']}x {r['gpu']} ({r['hosts']} host(s)), "
          f"compiled in {r['compile_s']} s")
    print(f"  memory/device    args {m['arguments']:.2f}, out {m['outputs']:.2f} (aliased {m['aliased']:.2f}), "
          f"temp {m['temporaries']:.2f}: peak {m['total']:.2f} GiB of {m['device']:.2f}: "
          f"{'fits' if r['fits'] else 'DOES NOT FIT'} with a {r['margin']:.0%} margin")
    print(f"  cuDNN attention  fwd {got['forward']:.0f} / bwd {got['backward']:.0f} per run "
          f"(model: {exp['forward']} / {exp['backward']}) {ok}" + (f"; other cuDNN {got['other']}" if got['other'] else ""))
    for a in r["xla_attention"]:
        print(f"  XLA attention    {a['kind']}: q {a['q']} kv {a['kv']} (traced {a['traced']}x)")
    if not r["xla_attention"]:
        print("  XLA attention    none (no dense-mask fallback)")
    for k, v in r["collectives"].items():
        across = f", {v['across_nodes_gb']:.2f} across nodes" if r["hosts"] > 1 else ""
        print(f"  {k:16s} {v['count']:6.0f}/run ({v['async']:.0f} async) {v['gb']:8.2f} GB{across}: "
              f"{v['s'] * 1e3:8.1f} ms, exposed {v['exposed_s'] * 1e3:7.1f} ms")
    print(f"  fusions          {r['fusions']} in the program, {r['fusion_launches']:.0f} launches per run")
    if r["unknown_trip_counts"]:
        print(f"  note             {r['unknown_trip_counts']} loop(s) of unknown trip count, counted once")
    print(f"  roofline         compute {roof['compute_s'] * 1e3:.1f} ms ({roof['hlo_tflop']:.1f} TFLOP, "
          f"{roof['f32_tflop']:.1f} at f32; {roof['hbm_gb']:.0f} GB HBM) + exposed collectives "
          f"{roof['exposed_collective_s'] * 1e3:.1f} ms = {roof['step_s'] * 1e3:.1f} ms")
    print("  compute by kind  " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in
                                            sorted(roof["compute_by_category_s"].items(), key=lambda kv: -kv[1])))
    print(f"  predicted        <= {roof['tokens_per_s_per_device']:,.0f} tokens/s per device, "
          f"MFU <= {roof['mfu_upper_bound']:.1%} (compiled, not measured)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--set", nargs="*", default=[], action="extend", metavar="KEY=VALUE")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    p.add_argument("--topology", default="1x1x8", help="SLICESxHOSTSxGPUS_PER_HOST (default 1x1x8: one node)")
    p.add_argument("--steps", default=None, help=f"comma-separated, of {', '.join(STEPS)} (default: all)")
    p.add_argument("--margin", type=float, default=0.10, help="memory to leave free (fraction of the device's)")
    p.add_argument("--images-per-row", type=int, default=22, help="train: images in a packed caption row (qwen2_vl: at most what data.max_patches holds)")
    p.add_argument("--image-grid", type=int, nargs=2, default=(32, 32), metavar=("H", "W"),
                   help="model.arch qwen2_vl: each image's patch grid (train rows and generation prompts)")
    p.add_argument("--gen-batch", type=int, default=32, help="prefill/decode: prompts per device")
    p.add_argument("--prompt-text", type=int, default=96, help="prefill: text tokens besides the image's")
    p.add_argument("--new-tokens", type=int, default=16, help="decode: cache room for this many new tokens")
    p.add_argument("--json", help="also write the reports to this file (a JSON list)")
    args = p.parse_args(argv)
    try:
        return run(args)
    except AotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    from oq2vl_jax.config import ConfigError, load_config

    if args.steps is not None and (bad := [s for s in args.steps.split(",") if s not in STEPS]):
        raise AotError(f"--steps: unknown {bad}; choose from {', '.join(STEPS)}")
    gpu = GPUS[args.gpu]
    devices = topology_devices(gpu, args.topology)
    hosts = int(args.topology.split("x")[0]) * int(args.topology.split("x")[1])
    try:  # no data, tokenizer or weights are read: only shapes
        cfg = load_config(args.config, ["train.init_from=null", "tokenizer=null", *args.set])
    except (ConfigError, OSError) as e:
        raise AotError(str(e)) from None
    if missing := cfg.model.unresolved():
        raise AotError(f"{args.config}: {', '.join(missing)} derived from data or a tokenizer at run time; "
                       f"give them with --set")
    if cfg.data.global_batch_size % (cfg.train.micro_batches * len(devices)):
        raise AotError(f"data.global_batch_size={cfg.data.global_batch_size} does not split into "
                       f"train.micro_batches={cfg.train.micro_batches} x {len(devices)} devices")
    steps = [s for s in args.steps.split(",") if s] if args.steps is not None else list(STEPS)
    name = os.path.splitext(os.path.basename(args.config))[0]
    reports = []
    for step in steps:
        with answering_for(gpu) as dense:
            if step == "train":
                lowered, info = compile_train(cfg, devices, args)
            else:
                lowered, info = compile_generation(cfg, devices, args, step)
            info["expected"] = expected_attention(cfg, step, len(devices), args.gen_batch)
        r = report(step, lowered, info, dense, cfg, gpu, len(devices) if step == "train" else 1, hosts, args.margin)
        r.update(config=name, overrides=args.set, remat=cfg.model.remat, micro_batches=cfg.train.micro_batches,
                 rows_per_device=cfg.data.global_batch_size // cfg.train.micro_batches // len(devices))
        print_report(r, name)
        reports.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
