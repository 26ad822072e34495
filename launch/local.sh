#!/usr/bin/env bash
# launch/local.sh N ARGS...: one cellrep run of N processes on this machine.
#
#   launch/local.sh 2 --config=configs/demo.py --workdir=workdir/demo2
#   CELLREP_CPU_DEVICES=4 launch/local.sh 2 ...     # 4 CPU devices per process
#
# Each process is `python -m cellrep.launch ARGS...` with CELLREP_COORDINATOR,
# CELLREP_NUM_PROCESSES and CELLREP_PROCESS_ID set (cellrep.distributed reads them).
# Process 0 prints to this terminal; process i > 0 logs to
# ${CELLREP_LOG_DIR:-${TMPDIR:-/tmp}}/cellrep-<port>-<i>.log. When one process fails the
# others are stopped and its exit code is this script's. Environment: PYTHON (default
# python3, or .venv/bin/python when it exists), CELLREP_PORT (default a free port),
# JAX_PLATFORMS (default cpu: on a GPU machine one process drives all its GPUs).
set -o pipefail  # not -u: bash < 4.4 calls an empty array unbound

if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: launch/local.sh N ARGS... (N: the number of processes)" >&2
  exit 2
fi
n=$1
shift
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $here/.venv/bin/python ]]; then PYTHON=$here/.venv/bin/python; else PYTHON=python3; fi
fi
port=${CELLREP_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
logs=${CELLREP_LOG_DIR:-${TMPDIR:-/tmp}}
mkdir -p "$logs"

# Processes of one machine share its CPUs; GPUs would be claimed by every process at once.
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
pids=()
# JAX's multi-process runtime takes SIGTERM as a preemption notice: after 5 s, SIGKILL.
stop() {
  kill "${pids[@]}" 2>/dev/null
  for _ in {1..25}; do
    kill -0 "${pids[@]}" 2>/dev/null || break
    sleep 0.2
  done
  kill -9 "${pids[@]}" 2>/dev/null
  wait 2>/dev/null
}
trap 'stop; exit 130' INT TERM
for ((i = 0; i < n; i++)); do
  export CELLREP_COORDINATOR=127.0.0.1:$port CELLREP_NUM_PROCESSES=$n CELLREP_PROCESS_ID=$i
  if ((i == 0)); then
    "$PYTHON" -m cellrep.launch "$@" &
  else
    "$PYTHON" -m cellrep.launch "$@" >"$logs/cellrep-$port-$i.log" 2>&1 &
  fi
  pids+=($!)
done

# Wait for all; the first to fail stops the others (polled: works with any bash).
status=0
while ((${#pids[@]})); do
  for i in "${!pids[@]}"; do
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    wait "${pids[$i]}"
    rc=$?
    unset "pids[$i]"
    if ((rc != 0)); then
      status=$rc
      if ((i > 0)) && [[ -n ${pids[0]:-} ]]; then
        # Bad input fails every process alike: give process 0 a moment to say it itself.
        for _ in {1..50}; do
          kill -0 "${pids[0]}" 2>/dev/null || break
          sleep 0.2
        done
        if ! kill -0 "${pids[0]}" 2>/dev/null; then
          wait "${pids[0]}"
          rc0=$?
          unset "pids[0]"
          if ((rc0 != 0)); then
            stop
            exit $rc0
          fi
        fi
      fi
      stop
      # Process 0 printed its own error; another's is in its log.
      if ((i > 0)); then
        line=$(grep -m1 "cellrep: error" "$logs/cellrep-$port-$i.log") &&
          echo "[process $i] $line" >&2 || echo "process $i failed: $logs/cellrep-$port-$i.log" >&2
      fi
      exit $status
    fi
  done
  sleep 0.2
done
exit $status
