#!/usr/bin/env bash
# Issue 19, v7 on one GPU: the CUDA tests of the new kernels, the expert GEMMs timed call by call with the fused-gather
# probe (benchmarks/expert_gemms.py), the trainer bench of this tree and, when OLD names a second tree, of that one
# (graphed), the layer at issue 19's shapes for both trees, and every graph-safe router graphed against eager.
# From the checkout to measure, OLD an export of another commit (git archive 18c721f | tar -x -C .gpu/old):
#   NEW=. [OLD=.gpu/old] OUT=dir [PARTS="tests gemms trainer layer routers"] bash benchmarks/issue19_v7_gpu.sh
# (docs/benchmarks.md, issue 19 v7)
set -u
NEW=$(cd "${NEW:?}" && pwd); SITE=${SITE:-/tmp/site}; PARTS=${PARTS:-tests gemms trainer layer routers}
[ -n "${OLD:-}" ] && OLD=$(cd "$OLD" && pwd)
part() { [[ " $PARTS " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > "$OUT/card.txt" 2>&1; date -u >> "$OUT/card.txt"
cd "$NEW"
if part tests; then
  PYTHONPATH=$SITE:$NEW timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_adamw.py \
    tests/test_step_graph.py tests/test_host_path.py > "$OUT/tests.txt" 2>&1
  grep -E "^E |Error|assert" "$OUT/tests.txt" | head -20; tail -3 "$OUT/tests.txt"
fi
if part gemms; then
  PYTHONPATH=$SITE:$NEW timeout 150 python3 benchmarks/expert_gemms.py --json "$OUT/expert-gemms.json" > "$OUT/expert-gemms.txt" 2>&1
  grep -E '^(\||#)' "$OUT/expert-gemms.txt"; grep -iE 'error|Traceback' "$OUT/expert-gemms.txt" | head -3
fi
bench() {  # tree, its directory, timeout, bench flags
  (cd "$2" && PYTHONPATH=$SITE:$2 timeout "$3" python3 -m routerlab.bench.trainer --warmup 5 --compile off \
     --json "$OUT/$1.json" "${@:4}") > "$OUT/$1.txt" 2>&1
  echo "== $1"; grep '^|' "$OUT/$1.txt" | grep -v 'host during stalls' | head -45
  grep -o '"step ms": \[[^]]*\], "logged": \[[^]]*\]' "$OUT/$1.txt"
}
layer() {  # tree, its directory, timeout, flags
  (cd "$2" && PYTHONPATH=$SITE:$2 timeout "$3" python3 -m routerlab.bench gpu --shapes issue19 --no-loop --no-stages \
     --json "$OUT/layer-$1.json" "${@:4}") > "$OUT/layer-$1.txt" 2>&1
  echo "== layer $1"; grep '^|' "$OUT/layer-$1.txt" | head -16; grep -iE 'error|Traceback' "$OUT/layer-$1.txt" | head -3
}
if part trainer; then
  [ -n "${OLD:-}" ] && cp "$NEW/routerlab/bench/trainer.py" "$OLD/routerlab/bench/trainer.py"
  bench new "$NEW" 150 --steps ${STEPS:-40} --cuda-graph on ${KERNELS:-}
  [ -n "${OLD:-}" ] && bench old "$OLD" 150 --steps ${STEPS:-40} --cuda-graph on ${KERNELS:-}
fi
if part layer; then
  layer new "$NEW" 150
  [ -n "${OLD:-}" ] && layer old "$OLD" 150 --no-transformers
fi
if part routers; then
  PYTHONPATH=$SITE:$NEW timeout 400 python3 benchmarks/graph_routers.py --json "$OUT/graph-routers.json" > "$OUT/graph-routers.txt" 2>&1
  grep -E '^(\||#|failed)' "$OUT/graph-routers.txt"; grep -iE 'Traceback' -A3 "$OUT/graph-routers.txt" | head -8
fi
date -u >> "$OUT/card.txt"
