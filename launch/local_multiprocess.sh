#!/usr/bin/env bash
# N training processes on this machine forming one JAX job through 127.0.0.1 (the way the tests
# run a multi-host job; also a way to try a multi-host setup before renting hosts).
#
# Usage: launch/local_multiprocess.sh [options] --config=PATH[:ARG] --workdir=DIR [--config.KEY=VALUE ...]
#   --num_processes=N    processes of the job (default 2)
#   --port=P             coordinator port on 127.0.0.1 (default 12355)
#   --cpu_devices=K      run on the CPU with K devices per process (added to XLA_FLAGS); default: the
#                        platform and devices JAX finds (every process sees all local devices)
#   --python=PATH        interpreter (default: $PYTHON, else python3)
#   --dry-run            print the commands, run nothing
# Every other argument goes to `python -m freesine_jax.main` unchanged. Process i prints its
# lines prefixed with "[i] ". SIGTERM/SIGINT are passed on to every process (each then saves a
# checkpoint and exits 0). The exit code is the first non-zero one of the processes, else 0.
set -euo pipefail

num_processes=2
port=12355
cpu_devices=""
python="${PYTHON:-python3}"
dry_run=false
train_args=()
for arg in "$@"; do
  case "$arg" in
    --num_processes=*) num_processes="${arg#*=}" ;;
    --port=*) port="${arg#*=}" ;;
    --cpu_devices=*) cpu_devices="${arg#*=}" ;;
    --python=*) python="${arg#*=}" ;;
    --dry-run) dry_run=true ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) train_args+=("$arg") ;;
  esac
done

fail() { echo "launch/local_multiprocess.sh: $*" >&2; exit 2; }
[[ "$num_processes" =~ ^[1-9][0-9]*$ ]] || fail "--num_processes=$num_processes is not a positive integer"
[[ "$port" =~ ^[0-9]+$ ]] || fail "--port=$port is not a port number"
[[ -z "$cpu_devices" || "$cpu_devices" =~ ^[1-9][0-9]*$ ]] \
  || fail "--cpu_devices=$cpu_devices is not a positive integer"
has_config=false
has_workdir=false
for arg in "${train_args[@]+"${train_args[@]}"}"; do
  case "$arg" in
    --config=*) has_config=true ;;
    --workdir=*) has_workdir=true ;;
  esac
done
$has_config || fail "pass --config=PATH (e.g. --config=configs/synthetic.py:tiny)"
$has_workdir || fail "pass --workdir=DIR"

env_vars=()
if [[ -n "$cpu_devices" ]]; then
  # Appended to the caller's XLA_FLAGS (kept; for a repeated flag XLA takes the last).
  env_vars=(env "JAX_PLATFORMS=cpu"
            "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$cpu_devices")
fi

# The command of process $1, one word per element of the array `command`.
command_of() {
  command=("${env_vars[@]+"${env_vars[@]}"}" "$python" -m freesine_jax.main
           "--coordinator_address=127.0.0.1:$port" "--num_processes=$num_processes"
           "--process_id=$1" "${train_args[@]}")
}

if $dry_run; then
  for ((i = 0; i < num_processes; i++)); do
    command_of "$i"
    line="$(printf '%q ' "${command[@]}")"
    echo "$line&"
  done
  echo "wait"
  exit 0
fi

pids=()
# shellcheck disable=SC2329  # called by the traps below
forward() {
  for pid in "${pids[@]}"; do kill -s "$1" "$pid" 2>/dev/null || true; done
}
trap 'forward TERM' TERM
trap 'forward INT' INT

for ((i = 0; i < num_processes; i++)); do
  command_of "$i"
  "${command[@]}" > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
  pids+=("$!")
done

status=0
for pid in "${pids[@]}"; do
  # `wait` returns early (above 128) when a trapped signal arrives: wait again until it exits.
  while true; do
    code=0
    wait "$pid" || code=$?
    if ((code > 128)) && kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  if ((code != 0 && status == 0)); then status=$code; fi
done
exit "$status"
