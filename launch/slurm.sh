#!/usr/bin/env bash
# SLURM GPU-cluster launcher for soft_jax: writes a batch script and submits it with sbatch.
# Inside the job, srun starts one process per GPU (default) or one per node; every process
# runs the same command and finds the others through jax.distributed:
#   SOFT_JAX_COORDINATOR   = first node of the job (scontrol show hostnames) : --port
#   SOFT_JAX_NUM_PROCESSES = $SLURM_NTASKS
#   SOFT_JAX_PROCESS_ID    = $SLURM_PROCID (set per task by srun)
#   SOFT_JAX_LOCAL_DEVICE_IDS = $SLURM_LOCALID (per GPU) or 0..G-1 (per node)
# (soft_jax/parallel/distributed.py reads these; without them it falls back to jax's own SLURM
# detection.) The work dir must be on a filesystem every node sees: all processes write
# their shards of each checkpoint there.
#
# Usage:
#   launch/slurm.sh [options] -- python -m soft_jax train --config configs/x.py [--config.k=v]
# Options:
#   --nodes N            nodes (default 2)
#   --gpus-per-node G    GPUs per node (default 8)
#   --per gpu|node       one process per GPU (default) or per node
#   --partition P  --account A  --time HH:MM:SS  --job-name NAME  --cpus-per-task C
#   --port PORT          coordinator port on the first node (default 12355)
#   --setup 'CMD'        shell line run before srun on the first node (e.g. module load / venv)
#   --script FILE        where to write the batch script (default: slurm-soft_jax.sbatch)
#   --dry-run            print the batch script, the sbatch command and each process's
#                        environment; submit nothing
set -euo pipefail

nodes=2
gpus=8
per=gpu
partition=""
account=""
time_limit="24:00:00"
job_name="soft_jax"
cpus=""
port=12355
setup=""
script="slurm-soft_jax.sbatch"
dry_run=0

# quote one word for a POSIX shell, readably: as is when safe, else in single quotes
q() {
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
die() { echo "slurm.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus="$2"; shift 2 ;;
    --per) per="$2"; shift 2 ;;
    --partition) partition="$2"; shift 2 ;;
    --account) account="$2"; shift 2 ;;
    --time) time_limit="$2"; shift 2 ;;
    --job-name) job_name="$2"; shift 2 ;;
    --cpus-per-task) cpus="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --setup) setup="$2"; shift 2 ;;
    --script) script="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (the command goes after --)" ;;
  esac
done
[[ $# -gt 0 ]] || die "no command given (put it after --)"
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer"
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer"
# shellcheck disable=SC2016  # $SLURM_LOCALID expands per task, inside srun
case "$per" in
  gpu) tasks_per_node="$gpus"; local_ids='$SLURM_LOCALID' ;;
  node) tasks_per_node=1; local_ids="$(seq -s, 0 $((gpus - 1)))" ;;
  *) die "--per must be gpu or node" ;;
esac
num_processes=$((nodes * tasks_per_node))

# the user's command, quoted once for the batch script
cmd_quoted=""
for arg in "$@"; do cmd_quoted+=" $(q "$arg")"; done
cmd_quoted="${cmd_quoted# }"

# shellcheck disable=SC2016  # the batch script's $VARS expand when the job runs
batch_script() {
  echo "#!/usr/bin/env bash"
  echo "#SBATCH --job-name=${job_name}"
  echo "#SBATCH --nodes=${nodes}"
  echo "#SBATCH --ntasks-per-node=${tasks_per_node}"
  echo "#SBATCH --gpus-per-node=${gpus}"
  [[ -n "$cpus" ]] && echo "#SBATCH --cpus-per-task=${cpus}"
  echo "#SBATCH --time=${time_limit}"
  [[ -n "$partition" ]] && echo "#SBATCH --partition=${partition}"
  [[ -n "$account" ]] && echo "#SBATCH --account=${account}"
  echo "#SBATCH --output=%x-%j.out"
  echo "set -euo pipefail"
  [[ -n "$setup" ]] && echo "$setup"
  echo 'coordinator_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)'  # not head: SIGPIPE + pipefail
  echo "export SOFT_JAX_COORDINATOR=\"\${coordinator_host}:${port}\""
  echo 'export SOFT_JAX_NUM_PROCESSES="$SLURM_NTASKS"'
  echo "srun --kill-on-bad-exit=1 --ntasks-per-node=${tasks_per_node} bash -c 'export SOFT_JAX_PROCESS_ID=\$SLURM_PROCID SOFT_JAX_LOCAL_DEVICE_IDS=${local_ids}; exec \"\$@\"' soft_jax ${cmd_quoted}"
}

if [[ "$dry_run" == 1 ]]; then
  echo "# batch script (${script}):"
  batch_script
  echo "# submit:"
  echo "sbatch $(q "$script")"
  echo "# ${num_processes} processes (${nodes} nodes x ${tasks_per_node}), environment of each:"
  for ((i = 0; i < num_processes; i++)); do
    node=$((i / tasks_per_node))
    local_rank=$((i % tasks_per_node))
    if [[ "$per" == gpu ]]; then ids="$local_rank"; else ids="$local_ids"; fi
    echo "process ${i} on node ${node}: SOFT_JAX_COORDINATOR=<first node>:${port}" \
         "SOFT_JAX_NUM_PROCESSES=${num_processes} SOFT_JAX_PROCESS_ID=${i}" \
         "SOFT_JAX_LOCAL_DEVICE_IDS=${ids} ${cmd_quoted}"
  done
  exit 0
fi

command -v sbatch >/dev/null || die "sbatch not found: run this on a SLURM login node (or use --dry-run)"
batch_script > "$script"
echo "wrote ${script}; submitting ${num_processes} processes on ${nodes} nodes"
sbatch "$script"
