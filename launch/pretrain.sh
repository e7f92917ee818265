#!/bin/bash
# Pretrain on a SLURM cluster:
#
#   sbatch [sbatch options] launch/pretrain.sh CONFIG [key=value ...]
#   sbatch --nodes=4 launch/pretrain.sh configs/sessa/1.3b.yaml run.name=sessa-1.3b
#
# One SLURM task per GPU: srun starts `python -m sessa_scale train CONFIG key=value ...` once per GPU,
# each with RANK / LOCAL_RANK / WORLD_SIZE from SLURM and the rendezvous (MASTER_ADDR, MASTER_PORT) on
# the first node of the allocation. No torchrun in between, so SLURM's signals reach the training
# processes directly. The same script runs 1 node or many (--nodes), and on CPU-only nodes
# (--gpus-per-node=0: gloo instead of NCCL).
#
# Preemption and auto-resume: 10 minutes before the time limit SLURM sends SIGUSR1 (--signal); on it,
# or on SIGTERM, every rank finishes the current step, they write a checkpoint together, and exit
# with status 75. This script then requeues the job (`scontrol requeue`, allowed by --requeue), and
# the restarted job resumes from the run directory's latest checkpoint (train.resume=auto, the
# default). Checkpoints live in run.dir (default runs/<run.name>, relative to the submission
# directory), so a requeued or resubmitted job finds them. The log is appended to across restarts.
#
# Environment knobs: SESSA_PYTHON (interpreter, default python3), SESSA_MASTER_PORT (rendezvous port;
# default derived from the job id), OMP_NUM_THREADS (default --cpus-per-task), NCCL_* (site-specific network settings such
# as NCCL_SOCKET_IFNAME / NCCL_IB_HCA are left to the cluster's defaults).
#
#SBATCH --job-name=sessa-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

PREEMPTED=75  # exit status of `sessa-scale train` after a preemption checkpoint (training/preemption.py)

if [[ $# -lt 1 || $1 == *=* ]]; then
    echo "usage: sbatch [sbatch options] launch/pretrain.sh CONFIG [key=value ...]" >&2
    exit 2
fi
if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "pretrain.sh: not inside a SLURM job; submit it with sbatch (or run \`sessa-scale train\` / torchrun directly)" >&2
    exit 2
fi
if [[ ! -f $1 ]]; then
    echo "pretrain.sh: config file $1 not found (relative paths are resolved from the submission directory $PWD)" >&2
    exit 2
fi

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
# The port comes from the job id unless SESSA_MASTER_PORT is set: an inherited MASTER_PORT is ignored,
# because sbatch exports the submitting shell's environment and a stale one (from an earlier torchrun or
# an interactive job) would collide with a port still in use.
export MASTER_PORT=${SESSA_MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a failed rank aborts, no hang
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
PYTHON=${SESSA_PYTHON:-python3}

# The batch shell itself must outlive a SIGTERM until the training processes have saved; bash runs
# these traps only after srun returns.
trap 'echo "pretrain.sh: batch shell received SIGTERM"' TERM
trap 'echo "pretrain.sh: batch shell received SIGUSR1"' USR1

echo "pretrain.sh: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NUM_NODES} node(s)" \
    "[$SLURM_JOB_NODELIST], ${SLURM_NTASKS} tasks, rendezvous $MASTER_ADDR:$MASTER_PORT, $(date -u +%FT%TZ)"

set +e
# Each task sees all GPUs of its node and uses GPU LOCAL_RANK; if the site binds one GPU per task,
# that GPU is device 0. Ranks leave together (status 0, or 75 after a preemption checkpoint), so no
# kill-on-bad-exit (it would kill ranks still shutting down after a 75); a rank that crashes takes the
# others down within --wait seconds.
srun --kill-on-bad-exit=0 --wait=120 bash -c '
    export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
    [[ -n ${CUDA_VISIBLE_DEVICES:-} && $CUDA_VISIBLE_DEVICES != *,* ]] && export LOCAL_RANK=0
    exec "$@"' pretrain "$PYTHON" -m sessa_scale train "$@"
status=$?
set -e

if [[ $status == "$PREEMPTED" ]]; then
    echo "pretrain.sh: training stopped at a checkpoint after a preemption signal; requeueing job $SLURM_JOB_ID"
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    echo "pretrain.sh: requeue failed; submit the same command again to resume from the checkpoint" >&2
fi
exit "$status"
