#!/bin/bash
# Issue 19 on one H200, one call, in order of priority (each step writes its log under $OUT as it goes):
#   1. correctness on CUDA (backends x dtypes vs float64 loop; fast path vs loop, dropless and at capacity 0.5)
#   2. the layer at issue 19's four shapes: ideal bmm, ours eager, CUDA graph, transformers grouped_mm
#   3. the trainer: E=64 k=6 MoE vs its dense twin, eager and train.compile=auto, plus the per-step profile
#   4. the layer under torch.compile (train.compile=moe) at the four shapes
#   5. the MoE trainer in float32 with TF32 on and off
set -x
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu --format=csv
export PYTHONUNBUFFERED=1
timeout 100 python3 -m routerlab.bench gpu --shapes issue19 --iters 10 --no-loop --no-stages --json $OUT/layer.json 2>&1 | tee $OUT/layer.txt
timeout 200 python3 -m routerlab.bench.trainer --steps 20 --warmup 5 --compile off,auto --json $OUT/trainer.json 2>&1 | grep -v Warning | tee $OUT/trainer.txt
timeout 120 python3 -c "
import json, torch
from routerlab.bench.core import run_gpu, gpu_table, SMALL_SHAPES
r = run_gpu(SMALL_SHAPES, 10, with_transformers=False, with_loop=False, stages=False, probe=False, compiled=True, graph=False)
print(gpu_table(r)); json.dump(r, open('$OUT/layer_compiled.json', 'w'), indent=1)
" 2>&1 | grep -v Warning | tee $OUT/layer_compiled.txt
timeout 60 python3 -m routerlab.bench.trainer --steps 10 --warmup 3 --compile none --fp32 2>&1 | grep -v Warning | tee $OUT/trainer_fp32.txt
