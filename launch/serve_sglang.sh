#!/usr/bin/env bash
# Serves the frozen simulator LM (Qwen3-8B by default) with SGLang, OpenAI-compatible,
# on 127.0.0.1. GPU only: SGLang cannot serve on CPU machines.
#
#   bash launch/serve_sglang.sh --setup        create .venv-sglang and install SGLang (pinned)
#   bash launch/serve_sglang.sh [EXTRA...]     start the server (foreground); EXTRA goes to SGLang
#   bash launch/serve_sglang.sh --print-args [EXTRA...]
#                                              print SGLang's arguments, one a line, and exit
#                                              (launch/check_sglang_flags.py parses them)
#
# Environment: MODEL (Qwen/Qwen3-8B), PORT (30000), MEM_FRACTION (0.85), DP_SIZE (unset: one
# replica; N: N data-parallel replicas on N GPUs), API_KEY (unset: no key), VENV (.venv-sglang),
# YARN_FACTOR (unset: Qwen3's native 32,768-token context; 4: the reference's long-context
# serving, 131,072 tokens by YaRN rope scaling over the native 32,768).
# Flags checked against sglang==0.5.23. The server is ready when GET /health answers 200;
# point the simulator client at http://127.0.0.1:$PORT.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${VENV:-.venv-sglang}"
args=(
  --model-path "${MODEL:-Qwen/Qwen3-8B}"
  --host 127.0.0.1
  --port "${PORT:-30000}"
  --reasoning-parser qwen3
  --tool-call-parser qwen25
  --grammar-backend llguidance
  --mem-fraction-static "${MEM_FRACTION:-0.85}"
)
if [[ -n "${DP_SIZE:-}" ]]; then args+=(--dp-size "${DP_SIZE}"); fi
if [[ -n "${API_KEY:-}" ]]; then args+=(--api-key "${API_KEY}"); fi
if [[ -n "${YARN_FACTOR:-}" ]]; then
  if ! [[ "${YARN_FACTOR}" =~ ^[1-9][0-9]*$ ]]; then
    echo "serve_sglang.sh: YARN_FACTOR must be a whole number (4 for the reference), got '${YARN_FACTOR}'" >&2
    exit 1
  fi
  args+=(--json-model-override-args
         "{\"rope_scaling\":{\"rope_type\":\"yarn\",\"factor\":${YARN_FACTOR}.0,\"original_max_position_embeddings\":32768}}"
         --context-length "$((32768 * YARN_FACTOR))")
fi

case "${1:-}" in
  --print-args)
    shift
    printed=("${args[@]}" "$@")
    for i in "${!printed[@]}"; do  # Never print the key itself.
      if [[ $i -gt 0 && "${printed[$((i - 1))]}" == "--api-key" ]]; then printed[i]="REDACTED"; fi
    done
    printf '%s\n' "${printed[@]}"
    exit 0
    ;;
  --setup)
    python3 -m venv "${venv}"
    "${venv}/bin/python" -m pip install -r requirements-sglang.txt
    exit 0
    ;;
esac

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "serve_sglang.sh: no NVIDIA GPU here (nvidia-smi not found); SGLang serves on GPU only." \
       "On CPU use the embedded server: python launch/serve_simulator.py" >&2
  exit 1
fi
if [[ ! -x "${venv}/bin/python" ]]; then
  echo "serve_sglang.sh: no virtualenv at ${venv}; create it with: bash launch/serve_sglang.sh --setup" >&2
  exit 1
fi
exec "${venv}/bin/python" -m sglang.launch_server "${args[@]}" "$@"
