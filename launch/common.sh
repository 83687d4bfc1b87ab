# Sourced by the launch/*.sh scripts (not run directly): repo root, venv on PATH, the entry
# module, usage on -h or no arguments, the pre-flight config check, CPU settings, and a
# runner for several "nodes" on this machine (loopback).
#
# Shared environment:
#   CAGE_TRAIN_MODULE  module the launcher starts (default cage_ds.train = cage-train)
#   CAGE_SKIP_CHECK=1  skip the pre-flight `--check --world-size N` of the config
#   MASTER_PORT        rendezvous port (default 29500)

CAGE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${VIRTUAL_ENV:-}" && -x "$CAGE_ROOT/.venv/bin/python" ]]; then
  export PATH="$CAGE_ROOT/.venv/bin:$PATH"
fi
CAGE_TRAIN_MODULE="${CAGE_TRAIN_MODULE:-cage_ds.train}"
MASTER_PORT="${MASTER_PORT:-29500}"
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"

# Print the calling script's header comment and exit when called with no args or -h/--help.
cage_usage_if_asked() {
  if (( $# == 0 )) || [[ "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit $(( $# == 0 ? 2 : 0 ))
  fi
}

# cage_count_or_exit LABEL VALUE: exit 2 unless VALUE is an integer >= 1 (a rank or node
# count; 0 would start one rank or none, silently).
cage_count_or_exit() {
  if [[ ! "$2" =~ ^[1-9][0-9]*$ ]]; then
    echo "launch: $1 must be an integer >= 1, got '$2'; nothing was started" >&2
    exit 2
  fi
}

# cage_preflight WORLD ARGS...: validate the resolved config for WORLD ranks before any
# worker starts (bad keys, missing data, batch not divisible by the world size, ...); the
# world size itself is checked even with CAGE_SKIP_CHECK=1.
cage_preflight() {
  local world="$1"; shift
  cage_count_or_exit "world size" "$world"
  [[ "${CAGE_SKIP_CHECK:-0}" == "1" ]] && return 0
  if ! python -m "$CAGE_TRAIN_MODULE" --check --world-size "$world" "$@" > /dev/null; then
    echo "launch: config check failed for world size $world; nothing was started" >&2
    exit 2
  fi
}

# DeepSpeed on CPU: gloo, one thread per rank unless set.
cage_cpu_env() {
  export DS_ACCELERATOR=cpu
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
}

# Total slots of a DeepSpeed hostfile ("host slots=N" lines, # comments).
cage_hostfile_slots() {
  awk '!/^[[:space:]]*(#|$)/ { for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) { sub(/slots=/, "", $i); s += $i } }
       END { print s + 0 }' "$1"
}

# Number of hosts in a DeepSpeed hostfile.
cage_hostfile_hosts() {
  awk '!/^[[:space:]]*(#|$)/ { n++ } END { print n + 0 }' "$1"
}

# cage_run_local_nodes N CMD...: run CMD N times in the background with NODE_RANK=0..N-1
# (N "nodes" on this machine), wait for all, return the first failure's status.
# Ctrl-C / TERM stops exactly the processes started here.
cage_run_local_nodes() {
  local n="$1"; shift
  local pids=() rank status=0
  for (( rank = 0; rank < n; rank++ )); do
    NODE_RANK="$rank" "$@" &
    pids+=("$!")
  done
  trap 'kill -TERM "${pids[@]}" 2>/dev/null' INT TERM
  for pid in "${pids[@]}"; do
    wait "$pid" || { local rc=$?; (( status == 0 )) && status=$rc; }
  done
  trap - INT TERM
  return "$status"
}

# cage_run_group CMD...: run CMD (the DeepSpeed launcher) in a process group of its own and
# return its status. INT/TERM/HUP to this script are passed on to CMD; once CMD has ended
# (however: signalled, killed, or done) whatever is left in its group - the ranks - gets TERM,
# then KILL after CAGE_KILL_GRACE_S (5) seconds. The DeepSpeed launcher alone does not take
# its ranks down when it is killed (they would train on and hold MASTER_PORT).
cage_run_group() {
  setsid "$@" &
  local pid=$! status=0
  trap 'kill -TERM "$pid" 2>/dev/null' INT TERM HUP
  while kill -0 "$pid" 2>/dev/null; do
    status=0
    wait "$pid" || status=$?  # returns early (status > 128) when a trapped signal arrives
  done
  trap - INT TERM HUP
  if kill -0 -- "-$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null
    local tenths=$(( ${CAGE_KILL_GRACE_S:-5} * 10 ))
    while (( tenths-- > 0 )) && kill -0 -- "-$pid" 2>/dev/null; do sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  return "$status"
}
