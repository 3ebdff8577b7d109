#!/bin/bash
# Issue 19 on one H200, one call, side by side (each step writes its log under $OUT as it goes):
#   1. the layer at issue 19's four shapes: ideal bmm, ours eager, ours CUDA graph, transformers grouped_mm
#   2. the trainer: the E=64 k=6 preset against its dense twin, train.cuda_graph on and off, each with a
#      torch.profiler kernel table (parts, GPU idle) and a host-sync census; the eager MoE step's parts timed alone
# (the earlier version of this script, with the torch.compile and float32 runs: git log -- benchmarks/issue19_gpu.sh)
set -x
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu --format=csv
export PYTHONUNBUFFERED=1
timeout 150 python3 -m routerlab.bench gpu --shapes issue19 --iters 10 --no-loop --no-stages --json $OUT/layer.json > $OUT/layer.txt 2>&1
tail -12 $OUT/layer.txt
timeout 240 python3 -m routerlab.bench.trainer --steps 20 --warmup 5 --compile off --cuda-graph on,off --kernels --json $OUT/trainer.json > $OUT/trainer.txt 2>&1
grep -v '^{"kernels' $OUT/trainer.txt | tail -75
