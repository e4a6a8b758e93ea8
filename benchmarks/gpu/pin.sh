#!/bin/bash
# Runs the command pinned to this rank's share of the CPU cores it may use: the allowed cores,
# in order, split evenly over the node's local ranks (torchrun's LOCAL_RANK / LOCAL_WORLD_SIZE).
#   torchrun --nproc_per_node=2 --no-python bash benchmarks/gpu/pin.sh python3 script.py ...
cores=$(python3 -c "
import os
c = sorted(os.sched_getaffinity(0)); r, n = int(os.environ.get('LOCAL_RANK', 0)), int(os.environ.get('LOCAL_WORLD_SIZE', 1))
k = len(c) // n
print(','.join(map(str, c[r * k:(r + 1) * k])))")
echo "rank ${LOCAL_RANK:-0}: cores $cores" >&2
exec taskset -c "$cores" "$@"
