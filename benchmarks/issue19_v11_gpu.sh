#!/usr/bin/env bash
# Issue 19, v11 and v12 on one GPU: the CUDA tests (the core graphs' among them); where the eager layer's time goes,
# router and core graphed, the core only, and nothing (benchmarks/eager_layer_host.py); `routerlab bench gpu --shapes issue19`; the trainer with the step
# not graphed, every kernel eager against each layer's core graphed (benchmarks/core_graph_trainer.py); and, when OLD
# names another tree, the graphed trainer pairs new/old (issue19_gpu_common.sh).
#   OUT=dir [OLD=.gpu/old] [PARTS="tests layer bench eager trainer"] [BENCH_FLAGS=...] [ROUTERS=...] [PAIRS=1] [STEPS=40] \
#     bash benchmarks/issue19_v11_gpu.sh
# With OLD, the layer bench runs new, old, new, old. (docs/benchmarks.md, issue 19 v11, v12, v13)
set -u
PARTS=${PARTS:-tests layer bench eager}
. "$PWD/benchmarks/issue19_gpu_common.sh"
if part tests; then
  cuda_tests "${TESTS:-tests/test_core_graph.py tests/test_triton_kernels.py tests/test_step_graph.py tests/test_moe_core.py}" \
    "${TESTS_K:-not interpreter and not hopper}"
fi
if part layer; then
  timeout 200 python3 benchmarks/eager_layer_host.py --json "$OUT/eager-layer-host.json" > "$OUT/eager-layer-host.txt" 2>&1
  grep -E "^\||x ideal" "$OUT/eager-layer-host.txt"; grep -iE "Traceback|Error" -A3 "$OUT/eager-layer-host.txt" | head -8
fi
bench_layer() {  # name, tree
  (cd "$2" && PYTHONPATH=$SITE:$2 timeout 300 python3 -m routerlab.bench gpu --shapes issue19 --no-loop --no-stages ${BENCH_FLAGS:-} \
     --json "$OUT/$1.json") > "$OUT/$1.txt" 2>&1
  echo "== $1"; grep -E "correctness|MoELayer|ideal|grouped_mm" "$OUT/$1.txt" | grep -v "^(" ; grep -iE "Traceback" -A3 "$OUT/$1.txt" | head -8
}
if part bench; then  # with OLD: new, old, new, old
  bench_layer bench "$NEW"
  [ -n "${OLD:-}" ] && { bench_layer bench-old "$OLD"; bench_layer bench-2 "$NEW"; bench_layer bench-old-2 "$OLD"; }
fi
if part eager; then
  timeout 400 python3 benchmarks/core_graph_trainer.py --routers "${ROUTERS:-softmax_topk,relu,expert_choice,dselect_k}" --rounds "${PAIRS:-1}" \
    --json "$OUT/core-graph-trainer.json" \
    > "$OUT/core-graph-trainer.txt" 2>&1
  grep -E "^\||core graphs /" "$OUT/core-graph-trainer.txt"; grep -iE "Traceback|Error" -A3 "$OUT/core-graph-trainer.txt" | head -8
fi
part trainer && trainer_pairs
date -u >> "$OUT/card.txt"
