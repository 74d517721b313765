#!/usr/bin/env bash
# Run the pipeline on one GPU host, data-parallel over all its GPUs (one process), and rerun
# it after a preemption (exit status 42: the run saved its checkpoint and asks to be rerun).
set -uo pipefail

PREEMPTED=42  # mood_jax.train.loop.PREEMPTED_EXIT_CODE

usage() {
  cat <<USAGE
usage: launch/gpu_single_host.sh [--dry-run] [--max-restarts N] CONFIG WORKDIR [--config.x=y ...]

Runs python -m mood_jax.main on this host; the mesh's data axis spans every visible GPU.
If the run is preempted (SIGTERM: it saves and exits with status $PREEMPTED), it is rerun
and resumes from that checkpoint, up to N times (default 100).
Install first:  pip install -r requirements.txt -e . && pip install -U "jax[cuda12]"
  --dry-run         print the command instead of running it
  --max-restarts N  reruns after preemption before giving up
Environment: PYTHON (default python) is the interpreter; select GPUs with CUDA_VISIBLE_DEVICES.
Example:
  launch/gpu_single_host.sh configs/digits.py /tmp/mood_digits --config.finetune.batch_size=256
USAGE
}

dry_run=0 max_restarts=100
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --max-restarts) max_restarts=$2; shift 2 ;;
    *) break ;;
  esac
done
if [ $# -lt 2 ]; then usage >&2; exit 2; fi
config=$1 workdir=$2; shift 2

cmd=("${PYTHON:-python}" -m mood_jax.main "--config=$config" "--workdir=$workdir" "$@")
if [ "$dry_run" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi

for ((attempt = 0; ; attempt++)); do
  "${cmd[@]}"
  status=$?
  if [ "$status" != "$PREEMPTED" ] || [ "$attempt" -ge "$max_restarts" ]; then exit "$status"; fi
  echo "gpu_single_host.sh: preempted (status $status); rerunning to resume" >&2
done
