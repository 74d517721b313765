#!/usr/bin/env bash
# Run the pipeline on one GPU host, data-parallel over all its GPUs (one process).
set -euo pipefail

usage() {
  cat <<USAGE
usage: launch/gpu_single_host.sh [--dry-run] CONFIG WORKDIR [--config.x=y ...]

Runs python -m mood_jax.main on this host; the mesh's data axis spans every visible GPU.
Install first:  pip install -r requirements.txt -e . && pip install -U "jax[cuda12]"
  --dry-run   print the command instead of running it
Select GPUs with CUDA_VISIBLE_DEVICES. Example:
  launch/gpu_single_host.sh configs/digits.py /tmp/mood_digits --config.finetune.batch_size=256
USAGE
}

dry_run=0
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  --dry-run) dry_run=1; shift ;;
esac
if [ $# -lt 2 ]; then usage >&2; exit 2; fi
config=$1 workdir=$2; shift 2

cmd=(python -m mood_jax.main "--config=$config" "--workdir=$workdir" "$@")
if [ "$dry_run" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; else exec "${cmd[@]}"; fi
