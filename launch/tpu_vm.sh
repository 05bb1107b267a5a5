#!/usr/bin/env bash
# Train on a Cloud TPU VM (one host or a multi-host slice) with gcloud: create it (optionally as
# a queued resource), copy this checkout to every worker, install, run the same
# `python -m freesine_jax.main --multihost ...` on all workers (their output streams here),
# optionally delete it. docs/launch.md walks through it.
#
# Usage: launch/tpu_vm.sh --name=NAME --zone=ZONE [options] --config=PATH[:ARG] --workdir=gs://BUCKET/DIR [--config.KEY=VALUE ...]
#   --name=NAME             TPU VM (and queued resource) name
#   --zone=ZONE             e.g. us-central2-b
#   --project=PROJECT       default: gcloud's configured project
#   --accelerator=TYPE      accelerator type to create, e.g. v4-8, v4-32, v5litepod-16 (default v4-8)
#   --version=VERSION       TPU software version to create (default tpu-ubuntu2204-base)
#   --create                create the TPU VM first (default: use an existing one)
#   --queued                with --create: request it as a queued resource and wait until ACTIVE
#   --spot                  with --create: spot capacity (preemptible: SIGTERM saves a checkpoint)
#   --delete                delete the TPU VM (and queued resource) when training ends
#   --dry-run               print the commands, run nothing
# Every other argument goes to `python -m freesine_jax.main` unchanged. The workdir must be a
# gs:// URL: every worker writes its shards of each checkpoint there.
set -euo pipefail

name=""
zone=""
project=""
accelerator="v4-8"
version="tpu-ubuntu2204-base"
create=false
queued=false
spot=false
delete=false
dry_run=false
train_args=()
for arg in "$@"; do
  case "$arg" in
    --name=*) name="${arg#*=}" ;;
    --zone=*) zone="${arg#*=}" ;;
    --project=*) project="${arg#*=}" ;;
    --accelerator=*) accelerator="${arg#*=}" ;;
    --version=*) version="${arg#*=}" ;;
    --create) create=true ;;
    --queued) queued=true ;;
    --spot) spot=true ;;
    --delete) delete=true ;;
    --dry-run) dry_run=true ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) train_args+=("$arg") ;;
  esac
done

fail() { echo "launch/tpu_vm.sh: $*" >&2; exit 2; }
[[ -n "$name" ]] || fail "pass --name=NAME (the TPU VM's name)"
[[ -n "$zone" ]] || fail "pass --zone=ZONE (e.g. --zone=us-central2-b)"
if $queued && ! $create; then fail "--queued creates a queued resource: pass --create too"; fi
if $spot && ! $create; then fail "--spot applies when creating: pass --create too"; fi
has_config=false
workdir=""
for arg in "${train_args[@]+"${train_args[@]}"}"; do
  case "$arg" in
    --config=*) has_config=true ;;
    --workdir=*) workdir="${arg#*=}" ;;
  esac
done
$has_config || fail "pass --config=PATH (e.g. --config=configs/pascal_context.py)"
[[ -n "$workdir" ]] || fail "pass --workdir=gs://BUCKET/DIR"
[[ "$workdir" == gs://* ]] \
  || fail "--workdir=$workdir is not a gs:// URL; every worker saves its shards of the checkpoints there"

repo="$(cd "$(dirname "$0")/.." && pwd)"
where=(--zone="$zone")
if [[ -n "$project" ]]; then where+=(--project="$project"); fi
tarball="/tmp/freesine_jax-$name.tar.gz"
remote_dir="freesine_jax"

# `run CMD...` executes the command, or prints it (shell-quoted) under --dry-run.
run() {
  if $dry_run; then
    local line
    line="$(printf '%q ' "$@")"
    echo "${line% }"
  else
    "$@"
  fi
}

if $create; then
  if $queued; then
    extra=()
    if $spot; then extra+=(--spot); fi
    run gcloud compute tpus queued-resources create "$name" --node-id="$name" \
      --accelerator-type="$accelerator" --runtime-version="$version" "${where[@]}" \
      "${extra[@]+"${extra[@]}"}"
    if $dry_run; then
      echo "# then poll until the queued resource is ACTIVE:"
    fi
    state_cmd=(gcloud compute tpus queued-resources describe "$name" "${where[@]}"
               --format=value\(state.state\))
    if $dry_run; then
      run "${state_cmd[@]}"
    else
      until [[ "$("${state_cmd[@]}")" == "ACTIVE" ]]; do
        echo "waiting for queued resource $name to become ACTIVE..."
        sleep 60
      done
    fi
  else
    extra=()
    if $spot; then extra+=(--spot); fi
    run gcloud compute tpus tpu-vm create "$name" --accelerator-type="$accelerator" \
      --version="$version" "${where[@]}" "${extra[@]+"${extra[@]}"}"
  fi
fi

# This checkout (without its virtual environment, git history and caches) on every worker.
run tar -czf "$tarball" -C "$repo" --exclude=./.venv --exclude=./.git --exclude=__pycache__ .
run gcloud compute tpus tpu-vm scp "$tarball" "$name:~/freesine_jax.tar.gz" --worker=all \
  "${where[@]}"
install="rm -rf ~/$remote_dir && mkdir -p ~/$remote_dir && tar -xzf ~/freesine_jax.tar.gz -C ~/$remote_dir && cd ~/$remote_dir && scripts/setup.sh tpu"
run gcloud compute tpus tpu-vm ssh "$name" --worker=all "${where[@]}" --command="$install"

# The same command on every worker: JAX finds the slice (--multihost), process 0 logs.
train_command="cd ~/$remote_dir && .venv/bin/python -m freesine_jax.main --multihost"
for arg in "${train_args[@]}"; do
  train_command+=" $(printf '%q' "$arg")"
done
status=0
run gcloud compute tpus tpu-vm ssh "$name" --worker=all "${where[@]}" \
  --command="$train_command" || status=$?

if $delete; then
  if $queued; then
    run gcloud compute tpus queued-resources delete "$name" "${where[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
  fi
fi
exit "$status"
