#!/usr/bin/env bash
# Cloud TPU pod launcher for soft_jax (gcloud TPU VMs): optionally create the TPU, copy this
# repository to every host, install it, and start the same command on every host at once
# (`gcloud compute tpus tpu-vm ssh --worker=all`). On a pod, jax.distributed.initialize()
# finds the coordinator (worker 0) and each host's process id from the TPU metadata;
# SOFT_JAX_DISTRIBUTED=1 makes soft_jax call it (soft_jax/parallel/distributed.py).
# With --num-slices N > 1 (multi-slice over DCN) the slices are created as one queued
# resource NAME with nodes NAME-0..NAME-(N-1); add e.g. --config.mesh.dcn_data=N to the
# command so the data axis spans the slices.
# The work dir must be storage every host sees (a gcsfuse / Filestore mount): every host
# writes its shards of each checkpoint there.
# Preflight: before it creates or uses the pod, a training command's step (`soft-jax train` or
# `python -m soft_jax train`) is compiled here for the pod's slice (soft-jax compile --topology
# ACCELERATOR --slices N, the TPU compiler on this host); a config that does not fit the
# chips' HBM is refused.
#
# Usage:
#   launch/tpu_pod.sh --name NAME --zone ZONE [options] -- python -m soft_jax train --config X
# Options:
#   --project P            gcloud project (default: gcloud's configured one)
#   --create               create the TPU VM first (needs --accelerator and --version)
#   --accelerator TYPE     e.g. v5p-32, v4-64, v5litepod-16 (default v5p-32); also the
#                          slice the preflight compiles for
#   --version V            TPU software version (default tpu-ubuntu2204-base)
#   --num-slices N         multi-slice: N slices as one queued resource (default 1)
#   --spot                 create as spot capacity
#   --no-install           skip copying and installing the code
#   --remote-dir DIR       where the code goes on each host (default soft_jax)
#   --pip 'SPEC'           extra pip requirement installed with the package
#                          (default 'jax[tpu]')
#   --skip-preflight       launch without compiling the step for the slice first
#   --preflight-python PY  python with soft_jax and libtpu for the preflight (default: this
#                          checkout's .venv/bin/python, else python3)
#   --dry-run              print every command exactly (preflight and gcloud), run nothing
set -euo pipefail

name=""
zone=""
project=""
create=0
accelerator="v5p-32"
version="tpu-ubuntu2204-base"
num_slices=1
spot=0
install=1
remote_dir="soft_jax"
pip_spec="jax[tpu]"
dry_run=0
preflight=1
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
preflight_python="python3"
[[ -x "$repo_root/.venv/bin/python" ]] && preflight_python="$repo_root/.venv/bin/python"

# quote one word for a POSIX shell, readably: as is when safe, else in single quotes
q() {
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --create) create=1; shift ;;
    --accelerator) accelerator="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --num-slices) num_slices="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --no-install) install=0; shift ;;
    --remote-dir) remote_dir="$2"; shift 2 ;;
    --pip) pip_spec="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --skip-preflight) preflight=0; shift ;;
    --preflight-python) preflight_python="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (the command goes after --)" ;;
  esac
done
[[ -n "$name" ]] || die "--name is required"
[[ -n "$zone" ]] || die "--zone is required"
[[ $# -gt 0 ]] || die "no command given (put it after --)"
[[ "$num_slices" =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive integer"

common=("--zone=${zone}")
[[ -n "$project" ]] && common+=("--project=${project}")

# run (or, with --dry-run, print) one command, quoted exactly as a shell would need it
run() {
  if [[ "$dry_run" == 1 ]]; then
    local out="" arg
    for arg in "$@"; do out+=" $(q "$arg")"; done
    echo "${out# }"
  else
    "$@"
  fi
}

# the arguments of a training command (what the preflight compiles): `soft-jax train ...`
# or `python -m soft_jax train ...`
train_args=()
is_train=0
for ((i = 1; i < $#; i++)); do
  j=$((i + 1))
  if [[ "${!i}" =~ (^|/)soft-jax$|^soft_jax$ && "${!j}" == "train" ]]; then
    is_train=1
    train_args=("${@:j+1}")
    break
  fi
done
if [[ "$preflight" == 0 ]]; then
  echo "# preflight skipped (--skip-preflight)"
elif [[ "$is_train" == 0 ]]; then
  echo "# preflight: not a soft-jax train command, nothing to compile"
else
  echo "# preflight (in ${repo_root}): compile the train step for ${accelerator} x ${num_slices} slice(s); launch only if it fits"
  status=0
  (cd "$repo_root" && run "$preflight_python" -m soft_jax compile --topology "$accelerator" \
    --slices "$num_slices" "${train_args[@]}") || status=$?
  if [[ "$status" == 3 ]]; then
    echo "tpu_pod.sh: the step does not fit ${accelerator} (the compile above says why; --fit suggests flags); --skip-preflight launches anyway" >&2
    exit 3
  elif [[ "$status" != 0 ]]; then
    die "the preflight compile failed (exit ${status}); fix the command or pass --skip-preflight"
  fi
fi

if [[ "$num_slices" -gt 1 ]]; then
  nodes=()
  for ((s = 0; s < num_slices; s++)); do nodes+=("${name}-${s}"); done
else
  nodes=("$name")
fi

if [[ "$create" == 1 ]]; then
  extra=()
  [[ "$spot" == 1 ]] && extra+=("--spot")
  if [[ "$num_slices" -gt 1 ]]; then
    run gcloud compute tpus queued-resources create "$name" "${common[@]}" \
      --accelerator-type="$accelerator" --runtime-version="$version" \
      --node-count="$num_slices" --node-prefix="$name" "${extra[@]}"
  else
    run gcloud compute tpus tpu-vm create "$name" "${common[@]}" \
      --accelerator-type="$accelerator" --version="$version" "${extra[@]}"
  fi
fi

# the user's command, quoted once for the remote shell
cmd_quoted=""
for arg in "$@"; do cmd_quoted+=" $(q "$arg")"; done
cmd_quoted="${cmd_quoted# }"
tarball="/tmp/${name}-soft_jax-src.tar.gz"
pip_quoted="$(q "$pip_spec")"

if [[ "$install" == 1 ]]; then
  # source only: no environments, caches or checkpoint / output folders
  run tar czf "$tarball" -C "$repo_root" --exclude=.git --exclude=.venv --exclude=venv \
    --exclude=runs --exclude=work_dirs --exclude=demo_out --exclude=checkpoints \
    --exclude=ckpt --exclude=./hf --exclude=./out --exclude=outputs --exclude=__pycache__ --exclude=.pytest_cache .
fi
for node in "${nodes[@]}"; do
  if [[ "$install" == 1 ]]; then
    run gcloud compute tpus tpu-vm scp "$tarball" "${node}:~/soft_jax-src.tar.gz" \
      --worker=all "${common[@]}"
    run gcloud compute tpus tpu-vm ssh "$node" --worker=all "${common[@]}" \
      --command="mkdir -p ~/${remote_dir} && tar xzf ~/soft_jax-src.tar.gz -C ~/${remote_dir} && cd ~/${remote_dir} && python3 -m pip install -q -U ${pip_quoted} -e ."
  fi
done
# start the same command on every host of every slice, all at once
env_line="SOFT_JAX_DISTRIBUTED=1"
if [[ "$dry_run" == 1 ]]; then
  echo "# every host runs: cd ~/${remote_dir} && ${env_line} ${cmd_quoted}"
  echo "# (jax.distributed.initialize() reads the coordinator, process count and id from the TPU metadata)"
fi
pids=()
for node in "${nodes[@]}"; do
  if [[ "$dry_run" == 1 || ${#nodes[@]} -eq 1 ]]; then
    run gcloud compute tpus tpu-vm ssh "$node" --worker=all "${common[@]}" \
      --command="cd ~/${remote_dir} && ${env_line} ${cmd_quoted}"
  else
    run gcloud compute tpus tpu-vm ssh "$node" --worker=all "${common[@]}" \
      --command="cd ~/${remote_dir} && ${env_line} ${cmd_quoted}" &
    pids+=("$!")
  fi
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
