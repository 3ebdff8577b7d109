#!/usr/bin/env bash
# Issue 19, v8 on one GPU: the CUDA tests; the probes of call 1 (the expert GEMMs with Inductor's max-autotune grouped
# GEMM beside torch's: benchmarks/expert_gemms.py --autotune; a logged step's anatomy and the optimizer-overlap bound:
# benchmarks/step_overlap.py; the anatomy with CUDA's modules loaded eagerly); the trainer bench of this tree and, when
# OLD names another tree, of that one; the anatomy of this tree. Calls 4-10 ran at 1c5e5de, whose bench and script
# also took --overlap-optimizer on,off and a "priority" part (train.overlap_optimizer, removed since: docs/benchmarks.md).
#   OUT=dir [OLD=.gpu/old] [PARTS="tests gemms overlap eager trainer anatomy"] bash benchmarks/issue19_v8_gpu.sh
# (docs/benchmarks.md, issue 19 v8)
set -u
SITE=${SITE:-/tmp/site}; PARTS=${PARTS:-tests trainer anatomy}; NEW=$PWD; export PYTHONPATH=$SITE:$PWD
[ -n "${OLD:-}" ] && OLD=$(cd "$OLD" && pwd)
part() { [[ " $PARTS " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > "$OUT/card.txt" 2>&1; date -u >> "$OUT/card.txt"
if part tests; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_adamw.py tests/test_step_graph.py \
    -k "${TESTS_K:-not interpreter}" > "$OUT/tests.txt" 2>&1
  grep -E "^E |Error|assert" "$OUT/tests.txt" | head -20; tail -3 "$OUT/tests.txt"
fi
if part gemms; then
  timeout 240 python3 benchmarks/expert_gemms.py --autotune --skip-probe --json "$OUT/expert-gemms.json" > "$OUT/expert-gemms.txt" 2>&1
  grep -E '^(\||#)' "$OUT/expert-gemms.txt"; grep -iE 'error|Traceback' "$OUT/expert-gemms.txt" | head -5
  grep -A4 'AUTOTUNE' "$OUT/expert-gemms.txt" | head -60
fi
if part overlap; then
  timeout 150 python3 benchmarks/step_overlap.py --json "$OUT/overlap.json" > "$OUT/overlap.txt" 2>&1
  grep -E '^#' "$OUT/overlap.txt"; grep -E '"step": (9|10|11|20|30)[,}]' "$OUT/overlap.txt"; grep -iE 'error|Traceback' -A3 "$OUT/overlap.txt" | head -8
fi
if part eager; then
  CUDA_MODULE_LOADING=EAGER timeout 120 python3 benchmarks/step_overlap.py --steps 22 --no-overlap > "$OUT/overlap-eager-loading.txt" 2>&1
  grep -E '^#' "$OUT/overlap-eager-loading.txt"; grep -E '"step": (9|10|11|20)[,}]' "$OUT/overlap-eager-loading.txt"
fi
bench() {  # name, tree, timeout, bench flags
  (cd "$2" && PYTHONPATH=$SITE:$2 timeout "$3" python3 -m routerlab.bench.trainer --warmup 5 --compile off --cuda-graph on \
     --steps ${STEPS:-40} --json "$OUT/$1.json" "${@:4}") > "$OUT/$1.txt" 2>&1
  echo "== $1"; grep '^|' "$OUT/$1.txt" | grep -v 'host during stalls' | head -60; grep -iE 'Traceback|Error' -A3 "$OUT/$1.txt" | head -8
}
if part trainer; then
  bench trainer-new "$NEW" 300 ${KERNELS:---kernels}
  if [ -n "${OLD:-}" ]; then cp "$NEW/routerlab/bench/trainer.py" "$OLD/routerlab/bench/trainer.py"; bench trainer-old "$OLD" 150; fi
fi
if part anatomy; then
  timeout 120 python3 benchmarks/step_overlap.py --no-overlap --json "$OUT/anatomy.json" > "$OUT/anatomy.txt" 2>&1
  grep -E '^#' "$OUT/anatomy.txt"; grep -E '"step": (10|11|20|21|30)[,}]' "$OUT/anatomy.txt"; grep -iE 'error|Traceback' -A3 "$OUT/anatomy.txt" | head -8
fi
date -u >> "$OUT/card.txt"
