#!/usr/bin/env bash
# Multi-node GPU runs under SLURM: one process per node, each driving all of its node's GPUs.
# The same file is the submitter and the batch job: sbatch runs it again with MOOD_IN_JOB=1.
set -uo pipefail

PREEMPTED=42  # mood_jax.exit_now.PREEMPTED_EXIT_CODE
JAX_LOST_PEER='JAX distributed service detected fatal errors'  # its abort's message

usage() {
  cat <<USAGE
usage: launch/slurm.sh [options] CONFIG WORKDIR [--config.x=y ...]

Submits a batch job with sbatch. In it, srun starts python -m mood_jax.main once per node;
JAX's distributed runtime finds the other processes from SLURM's environment. The job is
requeued (sbatch --requeue, scontrol requeue) when the run exits with status $PREEMPTED:
it saved its checkpoint on a preemption notice (SIGTERM) and resumes from it. Run from the
repository root, with its environment installed on every node:
  pip install -r requirements.txt -e . && pip install -U "jax[cuda12]"

Options:
  --nodes N              nodes (default 2)
  --gpus-per-node G      (default 8)
  --time T               wall time limit, sbatch format (default 24:00:00)
  --partition P          (default: the cluster's)
  --signal-seconds S     SIGTERM the run S seconds before the time limit, so it saves and
                         is requeued (default 300)
  --max-restarts N       requeues after status $PREEMPTED before giving up (default 20)
  --dry-run              print the sbatch command (and, in the job, the srun command)
  -h, --help             this text
Example:
  launch/slurm.sh --nodes 4 configs/imagenet.py /shared/runs/in1k
USAGE
}

nodes=2 gpus=8 time_limit=24:00:00 partition='' signal_seconds=300 dry_run=0 max_restarts=20
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --nodes) nodes=$2; shift 2 ;;
    --gpus-per-node) gpus=$2; shift 2 ;;
    --time) time_limit=$2; shift 2 ;;
    --partition) partition=$2; shift 2 ;;
    --signal-seconds) signal_seconds=$2; shift 2 ;;
    --max-restarts) max_restarts=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -*) echo "slurm.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [ $# -lt 2 ]; then usage >&2; exit 2; fi

do_cmd() {
  if [ "$dry_run" = 1 ]; then printf '%q ' "$@"; echo; return 0; fi
  "$@"
}

if [ -z "${MOOD_IN_JOB:-}" ]; then  # the submitter
  flags=("--nodes=$nodes" --ntasks-per-node=1 "--gpus-per-node=$gpus" "--time=$time_limit"
         --requeue "--signal=TERM@$signal_seconds" --job-name=mood_jax
         --output=mood_jax-%j.log --export=ALL,MOOD_IN_JOB=1)
  if [ -n "$partition" ]; then flags+=("--partition=$partition"); fi
  do_cmd sbatch "${flags[@]}" "$0" --max-restarts "$max_restarts" "$@"
  exit $?
fi

# The batch job: one task per node, each logging to its own file beside the job's log and
# leaving its exit status there. srun forwards SLURM's SIGTERM to every task; a task that
# fails ends the others (--kill-on-bad-exit), who would otherwise wait for it.
tasks="mood_jax-${SLURM_JOB_ID:-0}"
main=$(printf '%q ' python -m mood_jax.main "--config=$1" "--workdir=$2" "${@:3}")
# JAX aborts a process whose coordinator (process 0) is gone at once (status 134, before our
# peer watch can say so): that is a lost peer too.
log="$tasks.task\$SLURM_PROCID.log"
task="${main% } >> $log 2>&1; s=\$?; \
if [ \$s = 134 ] && tail -n 200 $log | grep -q '$JAX_LOST_PEER'; then s=$PREEMPTED; fi; \
echo \$s > $tasks.task\$SLURM_PROCID.status; exit \$s"
if [ "$dry_run" = 0 ]; then rm -f "$tasks".task*.status; fi  # a requeued job keeps its id
do_cmd srun --kill-on-bad-exit=1 bash -c "$task"
status=$?
if [ "$dry_run" = 1 ]; then exit 0; fi
# The first task whose status is neither 0 nor $PREEMPTED failed: a rerun would fail alike.
for file in "$tasks".task*.status; do
  [ -e "$file" ] || continue
  task_status=$(cat "$file")
  if [ "$task_status" != 0 ] && [ "$task_status" != "$PREEMPTED" ]; then
    echo "slurm.sh: the run failed with status $task_status on task" \
         "$(basename "${file%.status}" | sed 's/.*task//') (${file%.status}.log); its last lines:" >&2
    tail -n 20 "${file%.status}.log" >&2
    exit "$task_status"
  fi
  if [ "$task_status" = "$PREEMPTED" ]; then status=$PREEMPTED; fi
done
if [ "$status" = "$PREEMPTED" ]; then
  restarts=${SLURM_RESTART_COUNT:-0}  # SLURM counts the requeues of a job
  if [ "$restarts" -ge "$max_restarts" ]; then
    echo "slurm.sh: still preempted after $max_restarts restarts; giving up" >&2
    exit "$status"
  fi
  echo "slurm.sh: preempted; requeueing job ${SLURM_JOB_ID:-?} to resume, restart" \
       "$((restarts + 1)) of at most $max_restarts" >&2
  do_cmd scontrol requeue "${SLURM_JOB_ID:-}"
fi
exit "$status"
