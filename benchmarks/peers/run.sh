#!/usr/bin/env bash
# trustee-jax vs Tunix: builds .venv-tunix (google-tunix 0.1.7 pinned, this repo --no-deps) and
# runs benchmarks/peers/tunix_compare.py, which prints one JSON line. Arguments pass through:
#   bash benchmarks/peers/run.sh                 # the whole comparison (17 min on the shared 2-core CPU)
#   bash benchmarks/peers/run.sh --only update   # one figure
# The venv sees the system site-packages, so Tunix runs on the very jax/flax this project uses
# (jax 0.10.2, flax 0.12.8); what is missing there is installed into the venv at the pins below.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=.venv-tunix
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv --system-site-packages "$VENV"
fi
pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
pip_install -r requirements.txt
# Tunix declares heavy dependencies (tensorflow-datasets, grain, kagglehub, ...) that its model,
# sampler, GRPO loss and trainer never import; it goes in --no-deps with those it does import.
pip_install google-metrax==0.2.4 clu==0.0.12 jaxtyping==0.3.11 wadler-lindig==0.1.8 \
  sentencepiece==0.2.3 perfetto==0.59.1 pandas==3.1.1
pip_install --no-deps google-tunix==0.1.7
pip_install --no-deps -e .
"$VENV/bin/python" -c "import tunix.generate.sampler, tunix.rl.grpo.grpo_learner, trustee_jax"
exec "$VENV/bin/python" -W ignore benchmarks/peers/tunix_compare.py "$@"
