#!/usr/bin/env bash
# Everything this project measures on a GPU machine, in stages, each writing $OUT/<stage>.log (or
# ./device_out/ when OUT is unset). Run from the repository root:
#
#   bash bench/device_run.sh check train ablate   # cuDNN-vs-XLA checks, then the training benches
#   bash bench/device_run.sh generate data
#
# Stages:
#   check     tests/test_gpu.py: cuDNN packed/unmasked attention and the whole model vs XLA, bf16
#   train     bench/train_bench.py (pretrain shapes) beside the PyTorch baseline, if BASELINE names
#             its file (a PyTorch script kept outside this repository)
#   ablate    the same step with every image slot through the tower, then with XLA attention
#   generate  bench/generate_bench.py at full size: SFT (729 image tokens) and pre-training (144)
#   data      bench/pack_bench.py and bench/loader_bench.py with all cores
#   eval      bench/eval_bench.py at full size: benchmark questions/s (SFT: 729 image tokens)
#
# Packages the GPU image lacks (grain, array-record, webdataset, ...) are installed from wheels in
# WHEELS (default .whl/) when the directory exists; see the README's "Performance" section.
set -uo pipefail
OUT="${OUT:-device_out}"
mkdir -p "$OUT"
WHEELS="${WHEELS:-.whl}"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
CORES="$(nproc)"

run() {  # run STAGE CMD...: tee the output into $OUT/STAGE.log
  local stage="$1"; shift
  echo "### $stage: $*" | tee -a "$OUT/$stage.log"
  "$@" 2>&1 | tee -a "$OUT/$stage.log"
  echo "### $stage: exit ${PIPESTATUS[0]}" | tee -a "$OUT/$stage.log"
}

python3 - <<'EOF' | tee "$OUT/versions.log"
import importlib.metadata as md, jax
print("devices:", jax.devices())
for p in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "array-record", "transformers", "torch"):
    try:
        print(p, md.version(p))
    except md.PackageNotFoundError:
        print(p, "missing")
EOF

for stage in "$@"; do
  case "$stage" in
    check)
      run check env JAX_PLATFORMS=cuda,cpu python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py ;;
    train)
      run train python3 bench/train_bench.py --config configs/pretrain.yaml --rows-per-device 2 --images-per-row 22
      if [ -n "${BASELINE:-}" ]; then run train python3 "$BASELINE" --batch 2 --segmask; fi ;;
    ablate)  # what the defaults buy: every image slot through the tower; XLA attention
      run ablate python3 bench/train_bench.py --config configs/pretrain.yaml --rows-per-device 2 --images-per-row 22 \
        --set model.vision_chunk_size=0
      run ablate python3 bench/train_bench.py --config configs/pretrain.yaml --rows-per-device 2 --images-per-row 22 \
        --set model.attention=xla ;;
    generate)
      run generate python3 bench/generate_bench.py --config configs/sft.yaml --batch 8 --max-new-tokens 128
      run generate python3 bench/generate_bench.py --config configs/pretrain.yaml --batch 32 --max-new-tokens 128 ;;
    data)
      run data python3 bench/pack_bench.py --samples $((500 * CORES)) --shards "$CORES" --workers 1 "$CORES"
      run data python3 bench/loader_bench.py --samples 2000 --batches 60 --workers 0 1 $((CORES / 2)) "$CORES" ;;
    eval)
      run eval python3 bench/eval_bench.py --config configs/sft.yaml --batch 32 --questions 256
      run eval python3 bench/eval_bench.py --config configs/sft.yaml --batch 32 --questions 256 \
        --set model.param_dtype=bfloat16 ;;
    *) echo "unknown stage $stage (check, train, ablate, generate, data, eval)"; exit 2 ;;
  esac
done
