#!/usr/bin/env bash
# Cloud TPU VMs (single- or multi-host slices): create, set up, run, watch and delete, with
# automatic relaunch after a preemption.
set -uo pipefail

PREEMPTED=42  # mood_jax.exit_now.PREEMPTED_EXIT_CODE
JAX_LOST_PEER='JAX distributed service detected fatal errors'  # its abort's message
REMOTE_DIR='~/mood_jax'
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$REPO/launch/tpu_vm.sh"
# Where `run` keeps each VM's supervisor log and pid, on the machine that runs this script.
STATE_DIR=${TPU_STATE_DIR:-$HOME/.mood_jax/tpu_vm}

usage() {
  cat <<USAGE
usage: launch/tpu_vm.sh [options] COMMAND [ARGS]

Commands:
  create                     create the TPU VM (spot with --spot)
  setup                      copy this checkout's committed files (git archive HEAD) to every
                             worker and install them, with the jax[tpu] of the pinned jax
                             version and gcsfs; refuses while the checkout has uncommitted
                             changes, which would not be shipped (--allow-dirty: ship HEAD anyway)
  run CONFIG WORKDIR [--config.x=y ...]
                             start the supervisor as a detached process on this machine (it
                             outlives the terminal; log and pid in $STATE_DIR/NAME.{log,pid})
                             and return. The supervisor runs python -m mood_jax.main on every
                             worker (--worker=all), the same command on each host; WORKDIR (and
                             --config.data.data_dir) may be gs:// paths. It reruns after a
                             preemption: exit status $PREEMPTED means the run saved and asks to
                             be rerun; a preempted spot VM is deleted, recreated and set up again
                             first. Up to --max-restarts times. This machine must stay up: a
                             laptop that sleeps stops it (docs/launching.md).
  supervise CONFIG WORKDIR [--config.x=y ...]
                             the supervisor itself, in the foreground
  status                     the VM's state (READY, PREEMPTED, ...), and the supervisor's
  logs                       the last 100 lines of worker 0's run log
  delete                     delete the VM

Options (or the environment variables in brackets):
  --name NAME                VM name [TPU_NAME, default mood-jax]
  --zone ZONE                [TPU_ZONE, default us-central2-b]
  --type TYPE                accelerator type [TPU_TYPE, default v4-8]; v4-32 etc. are multi-host
  --version VERSION          TPU VM runtime [TPU_VERSION, default tpu-ubuntu2204-base]
  --project PROJECT          [TPU_PROJECT, default: gcloud's configured project]
  --spot                     create a spot VM (cheaper, preemptible)
  --max-restarts N           reruns after preemption before giving up (default 20)
  --allow-dirty              setup: ship HEAD even if the checkout has uncommitted changes
  --dry-run                  print the gcloud commands instead of running them
  -h, --help                 this text

Example (a v4-32 pod slice, 4 hosts):
  launch/tpu_vm.sh --name ood --type v4-32 --spot create
  launch/tpu_vm.sh --name ood --type v4-32 setup
  launch/tpu_vm.sh --name ood --type v4-32 --spot run configs/imagenet.py gs://BUCKET/runs/in1k \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets
  tail -f ~/.mood_jax/tpu_vm/ood.log  # the supervisor (launch/tpu_vm.sh --name ood logs: the run)
USAGE
}

name=${TPU_NAME:-mood-jax} zone=${TPU_ZONE:-us-central2-b} type=${TPU_TYPE:-v4-8}
version=${TPU_VERSION:-tpu-ubuntu2204-base} project=${TPU_PROJECT:-}
spot=0 dry_run=0 max_restarts=20 allow_dirty=0 commit=HEAD
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name) name=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --type) type=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --spot) spot=1; shift ;;
    --max-restarts) max_restarts=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --allow-dirty) allow_dirty=1; shift ;;
    -*) echo "tpu_vm.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [ $# -lt 1 ]; then usage >&2; exit 2; fi
command=$1; shift

tpu=(gcloud compute tpus tpu-vm)
where=("--zone=$zone")
if [ -n "$project" ]; then where+=("--project=$project"); fi

# Runs (or, with --dry-run, prints) one command.
do_cmd() {
  if [ "$dry_run" = 1 ]; then printf '%q ' "$@"; echo; return 0; fi
  "$@"
}

on_workers() {  # WORKERS REMOTE_COMMAND
  do_cmd "${tpu[@]}" ssh "$name" "${where[@]}" "--worker=$1" "--command=$2"
}

create() {
  local flags=("--accelerator-type=$type" "--version=$version")
  if [ "$spot" = 1 ]; then flags+=(--spot); fi
  do_cmd "${tpu[@]}" create "$name" "${where[@]}" "${flags[@]}"
}

setup() {
  # The committed files only (git archive HEAD), so every host runs the same, known code.
  local changes jax_version archive=/tmp/mood_jax_src.tar.gz
  changes=$(git -C "$REPO" status --porcelain)
  if [ -n "$changes" ] && [ "$allow_dirty" = 0 ]; then
    echo "tpu_vm.sh: setup ships only committed files (git archive HEAD), and this checkout has" \
         "uncommitted changes: commit or stash them, or pass --allow-dirty to ship HEAD anyway:" >&2
    echo "$changes" >&2
    exit 1
  fi
  # jax[tpu] of the pinned jax, so the TPU build does not replace it with another version.
  jax_version=$(sed -n 's/^jax==\([^ ]*\).*/\1/p' "$REPO/requirements.txt")
  do_cmd git -C "$REPO" archive --format=tar.gz -o "$archive" "$commit"
  do_cmd "${tpu[@]}" scp "$archive" "$name:/tmp/mood_jax_src.tar.gz" "${where[@]}" --worker=all
  on_workers all "mkdir -p $REMOTE_DIR && tar -xzf /tmp/mood_jax_src.tar.gz -C $REMOTE_DIR \
&& cd $REMOTE_DIR && python3 -m venv .venv && . .venv/bin/activate \
&& pip install -q -r requirements.txt -e . && pip install -q 'jax[tpu]==$jax_version' gcsfs"
}

state() {
  if [ "$dry_run" = 1 ]; then echo READY; return; fi
  "${tpu[@]}" describe "$name" "${where[@]}" --format='value(state)' 2>/dev/null || echo MISSING
}

# The options this script was called with, for the detached supervisor (--dry-run aside:
# a dry run prints the supervisor's command as a real run starts it).
options() {
  printf '%s\n' --name "$name" --zone "$zone" --type "$type" --version "$version" \
    --max-restarts "$max_restarts"
  if [ -n "$project" ]; then printf '%s\n' --project "$project"; fi
  if [ "$spot" = 1 ]; then echo --spot; fi
}

# Starts `supervise` in a new session (setsid), detached from this terminal, so that closing
# it or logging out does not stop the supervision.
run() {
  if [ $# -lt 2 ]; then echo 'tpu_vm.sh: run needs CONFIG WORKDIR' >&2; exit 2; fi
  local log="$STATE_DIR/$name.log" pid_file="$STATE_DIR/$name.pid" opts
  if [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
    echo "tpu_vm.sh: a supervisor for $name is running (pid $(cat "$pid_file")); stop it" \
         "first: kill $(cat "$pid_file")" >&2
    exit 1
  fi
  mapfile -t opts < <(options)
  local supervisor=(setsid nohup "$SELF" "${opts[@]}" supervise "$@")
  if [ "$dry_run" = 1 ]; then
    echo "$(printf '%q ' "${supervisor[@]}")> $(printf '%q' "$log") 2>&1 < /dev/null &"
    echo "# the supervisor then runs:"
    supervise "$@"
    return
  fi
  mkdir -p "$STATE_DIR"
  "${supervisor[@]}" > "$log" 2>&1 < /dev/null &
  echo $! > "$pid_file"
  echo "tpu_vm.sh: supervisor started (pid $!); follow it: tail -f $log; stop it: kill $!"
}

supervise() {
  if [ $# -lt 2 ]; then echo 'tpu_vm.sh: supervise needs CONFIG WORKDIR' >&2; exit 2; fi
  local main args output statuses status restarts=0
  # A recreated VM gets the commit the run started with, whatever the checkout holds by then.
  commit=$(git -C "$REPO" rev-parse HEAD) allow_dirty=1
  main=$(printf '%q ' python -m mood_jax.main "--config=$1" "--workdir=$2" "${@:3}")
  # Each worker reports its exit status in one tagged line; one that failed otherwise than
  # by a preemption (status $PREEMPTED) adds the last lines of its log, tagged with its host.
  # JAX aborts a process whose coordinator (process 0) is gone at once (status 134, before
  # our peer watch can say so): that is a lost peer too.
  args="cd $REMOTE_DIR && . .venv/bin/activate && { $main > run.log 2>&1; s=\$?; \
if [ \$s = 134 ] && tail -n 200 run.log | grep -q '$JAX_LOST_PEER'; then s=$PREEMPTED; fi; \
echo \$s > run.status; echo \"mood_jax-status \$(hostname) \$s\"; \
if [ \$s != 0 ] && [ \$s != $PREEMPTED ]; then tail -n 20 run.log | sed \"s/^/[\$(hostname)] /\"; fi; }"
  while true; do
    case "$(state)" in
      READY) ;;
      PREEMPTED|TERMINATED|MISSING)  # a preempted spot VM comes back only by recreating it
        do_cmd "${tpu[@]}" delete "$name" "${where[@]}" --quiet
        create && setup || exit 1 ;;
      *) echo "tpu_vm.sh: VM $name is $(state); waiting" >&2; sleep 60; continue ;;
    esac
    if [ "$dry_run" = 1 ]; then on_workers all "$args"; return 0; fi
    output=$(on_workers all "$args" 2>&1)
    statuses=$(sed -n 's/^mood_jax-status \([^ ]*\) \([0-9]*\)$/\1 \2/p' <<< "$output")
    # A status other than 0 and $PREEMPTED on any worker stops the supervision: a rerun would
    # fail alike. Its log's last lines say why.
    status=$(awk -v p="$PREEMPTED" '$2 != 0 && $2 != p {print $2; exit}' <<< "$statuses")
    if [ -n "$status" ] && [ "$(state)" = READY ]; then
      echo "tpu_vm.sh: the run failed with status $status on" \
           "$(awk -v p="$PREEMPTED" '$2 != 0 && $2 != p {print $1}' <<< "$statuses" | xargs);" \
           "the last lines of its log:" >&2
      grep '^\[' <<< "$output" >&2
      return "$status"
    fi
    # Every worker reported 0: done. Otherwise (42s, or workers that never reported because
    # their VM went away) it was preempted: the state check above decides on recreating.
    if [ -n "$statuses" ] && awk '$2 != 0 {exit 1}' <<< "$statuses"; then
      echo "tpu_vm.sh: finished" >&2; return 0
    fi
    if [ "$restarts" -ge "$max_restarts" ]; then
      echo "tpu_vm.sh: still preempted after $max_restarts restarts; giving up" >&2
      return "$PREEMPTED"
    fi
    restarts=$((restarts + 1))
    echo "tpu_vm.sh: preempted (worker statuses: $(tr '\n' ' ' <<< "$statuses")); relaunching" \
         "to resume, restart $restarts of at most $max_restarts" >&2
  done
}

case "$command" in
  create) create ;;
  setup) setup ;;
  run) run "$@" ;;
  supervise) supervise "$@" ;;
  status)
    do_cmd "${tpu[@]}" describe "$name" "${where[@]}" --format='value(state)'
    if [ -f "$STATE_DIR/$name.pid" ] && kill -0 "$(cat "$STATE_DIR/$name.pid")" 2>/dev/null; then
      echo "supervisor: running (pid $(cat "$STATE_DIR/$name.pid"), log $STATE_DIR/$name.log)"
    else
      echo "supervisor: not running (log $STATE_DIR/$name.log)"
    fi ;;
  logs) on_workers 0 "tail -n 100 $REMOTE_DIR/run.log" ;;
  delete) do_cmd "${tpu[@]}" delete "$name" "${where[@]}" --quiet ;;
  *) echo "tpu_vm.sh: unknown command $command (see --help)" >&2; exit 2 ;;
esac
