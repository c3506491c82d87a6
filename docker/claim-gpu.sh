#!/bin/sh
# Entrypoint of the worker image: give this container one GPU of $GPU_POOL that
# no other replica holds, then exec the command on it.
#
# GPU_POOL lists host GPUs as nvidia-smi names them (indices or UUIDs, comma
# separated), e.g. "1,2,3": `docker compose up -d --scale worker=3` then runs one
# worker per GPU. The container sees all GPUs; CUDA_VISIBLE_DEVICES narrows it to
# the claimed one. A claim is an flock on $GPU_LOCK_DIR/gpu-<id>.lock, a volume
# shared by the replicas; the kernel releases it when the process exits, so a
# crashed replica's GPU is free for its replacement. Empty GPU_POOL (beat, the
# CPU variant): run the command as it is.
set -eu

pool="${GPU_POOL:-}"
if [ -z "$pool" ]; then
    exec "$@"
fi

lock_dir="${GPU_LOCK_DIR:-/locks}"
mkdir -p "$lock_dir"
for gpu in $(echo "$pool" | tr ',' ' '); do
    exec 9>"$lock_dir/gpu-$gpu.lock"
    if flock -n 9; then
        echo "draftloop-claim-gpu: this replica runs on GPU $gpu (pool $pool)" >&2
        export CUDA_VISIBLE_DEVICES="$gpu"
        export CUDA_DEVICE_ORDER=PCI_BUS_ID
        # fd 9 stays open across exec: the lock lives exactly as long as the command.
        exec "$@"
    fi
done
exec 9>&-
echo "draftloop-claim-gpu: every GPU of GPU_POOL=$pool is taken by another replica;" \
     "add GPUs to WORKER_GPUS in .env or run fewer workers" >&2
exit 75
