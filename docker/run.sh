#!/usr/bin/env bash
# Train on this node's GPUs inside the image built from docker/Dockerfile:
#
#   docker/run.sh CONFIG [key=value ...]
#   RUNS=/mnt/runs DATA=/mnt/shards docker/run.sh configs/sessa/125m.yaml run.name=exp1
#
# One torchrun process per visible GPU (NPROC=gpu). RUNS (default ./runs) is mounted at the image's
# runs/ directory, where run.dir defaults to runs/<run.name>, so checkpoints survive the container and
# running the same command again resumes (train.resume=auto). DATA (default ./data, if it exists) is
# mounted read-only at /data. CONFIG is a path inside the image (the repository's configs/ are copied
# there); mount your own with DOCKER_ARGS="-v /path/my-configs:/opt/sessa_scale/configs/mine:ro".
#
# `docker stop` (SIGTERM) lets every rank finish its step and write a checkpoint first: torchrun
# forwards the signal and waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds, docker --stop-timeout longer.
#
# The container runs as the image's user (root), so files under RUNS belong to root.
# Environment: IMAGE (default sessa-scale), GPUS (docker --gpus, default all), NPROC, RUNS, DATA,
# DOCKER_ARGS (extra `docker run` arguments, word-split).
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: docker/run.sh CONFIG [key=value ...]" >&2
    exit 2
fi
RUNS=$(realpath -m "${RUNS:-runs}")
DATA=${DATA:-data}
mkdir -p "$RUNS"
mounts=(-v "$RUNS:/opt/sessa_scale/runs")
[[ -d $DATA ]] && mounts+=(-v "$(realpath "$DATA"):/data:ro")

# shellcheck disable=SC2086  # DOCKER_ARGS is word-split on purpose
exec docker run --rm --init \
    --gpus "${GPUS:-all}" --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
    --stop-timeout 600 -e TORCH_ELASTIC_SHUTDOWN_TIMEOUT=570 \
    "${mounts[@]}" ${DOCKER_ARGS:-} "${IMAGE:-sessa-scale}" \
    torchrun --standalone --nproc-per-node="${NPROC:-gpu}" -m sessa_scale train "$@"
