#!/usr/bin/env bash
# Runs one training command on every worker of a Cloud TPU VM slice (JAX multi-controller:
# each host runs the same program; jax.distributed finds the slice by itself, config
# `distributed.mode=auto`). Checkpoints need a directory every host sees: use gs://.
#
#   bash launch/tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--setup] [--detach] \
#       [--dry-run] -- --config configs/qwen3_8b.py:tpu --workdir gs://BUCKET/runs/x [...]
#
#   --setup    copy this checkout to ~/trustee-jax on every worker and install it with
#              jax[tpu] (pinned as in requirements.txt) before training
#   --detach   start under nohup on each worker (logs: ~/trustee-jax/tpu_worker.log) and
#              return; otherwise stream every worker's output here until the run ends
#   --dry-run  print the gcloud commands instead of running them
# Environment: REMOTE_DIR (~/trustee-jax on the workers), PYTHON (python3 there).
set -euo pipefail
cd "$(dirname "$0")/.."

tpu="" zone="" project="" setup=0 detach=0 dry=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --setup) setup=1; shift ;;
    --detach) detach=1; shift ;;
    --dry-run) dry=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "tpu_pod.sh: unknown option $1 (train.py arguments go after --)" >&2; exit 2 ;;
  esac
done
if [[ -z "$tpu" || -z "$zone" ]]; then
  echo "tpu_pod.sh: --tpu and --zone are required" >&2; exit 2
fi
if [[ $# -eq 0 ]]; then
  echo "tpu_pod.sh: no train.py arguments after -- (need at least --config and --workdir)" >&2
  exit 2
fi
if [[ $dry -eq 0 ]] && ! command -v gcloud >/dev/null; then
  echo "tpu_pod.sh: gcloud is not installed (https://cloud.google.com/sdk)" >&2; exit 127
fi

remote="${REMOTE_DIR:-~/trustee-jax}"
py="${PYTHON:-python3}"
jax_version="$(sed -n 's/^jax==//p' requirements.txt)"
gc=(gcloud compute tpus tpu-vm)
where=(--zone "$zone" --worker=all)
if [[ -n "$project" ]]; then where+=(--project "$project"); fi

run() {
  if [[ $dry -eq 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

if [[ $setup -eq 1 ]]; then
  tarball="$(mktemp -d)/trustee-jax.tar.gz"
  run git archive --format=tar.gz -o "$tarball" HEAD
  run "${gc[@]}" scp "$tarball" "$tpu:/tmp/trustee-jax.tar.gz" "${where[@]}"
  run "${gc[@]}" ssh "$tpu" "${where[@]}" --command \
    "mkdir -p $remote && tar -xzf /tmp/trustee-jax.tar.gz -C $remote && cd $remote && \
     $py -m pip install -q 'jax[tpu]==$jax_version' && PATH=\$HOME/.local/bin:\$PATH bash install.sh"
fi

train="cd $remote && $py launch/train.py $(printf '%q ' "$@")"
if [[ $detach -eq 1 ]]; then
  train="cd $remote && nohup $py launch/train.py $(printf '%q ' "$@") > tpu_worker.log 2>&1 &"
fi
run "${gc[@]}" ssh "$tpu" "${where[@]}" --command "$train"
