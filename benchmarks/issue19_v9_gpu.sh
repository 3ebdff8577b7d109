#!/usr/bin/env bash
# Issue 19, v9 on one GPU: the CUDA tests; the router gate's kernels against the cast path (benchmarks/router_gate.py);
# the optimizer step and the gradient norm (benchmarks/optimizer_step.py); the trainer bench of this tree and, when OLD
# names another tree, of that one, in the order new, old, new, old (ROUNDS pairs; pair KERNEL_ROUND, default 1, with
# --kernels).
#   OUT=dir [OLD=.gpu/old] [PARTS="tests gate optimizer trainer"] [ROUNDS=2] bash benchmarks/issue19_v9_gpu.sh
# (docs/benchmarks.md, issue 19 v9)
set -u
SITE=${SITE:-/tmp/site}; PARTS=${PARTS:-tests gate optimizer trainer}; NEW=$PWD; export PYTHONPATH=$SITE:$PWD
[ -n "${OLD:-}" ] && OLD=$(cd "$OLD" && pwd)
part() { [[ " $PARTS " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > "$OUT/card.txt" 2>&1; date -u >> "$OUT/card.txt"
if part tests; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_adamw.py tests/test_step_graph.py \
    -k "${TESTS_K:-not interpreter}" > "$OUT/tests.txt" 2>&1
  grep -E "^E |Error|assert" "$OUT/tests.txt" | head -20; tail -3 "$OUT/tests.txt"
fi
if part gate; then
  timeout 90 python3 benchmarks/router_gate.py > "$OUT/router-gate.txt" 2>&1; grep -E "^(#|\|)" "$OUT/router-gate.txt"; grep -iE "Traceback|Error" -A3 "$OUT/router-gate.txt" | head -8
fi
if part optimizer; then
  timeout 150 python3 benchmarks/optimizer_step.py > "$OUT/optimizer-step.txt" 2>&1
  grep -E '^\|' "$OUT/optimizer-step.txt"; grep -A4 '"gradient norms"' "$OUT/optimizer-step.txt"; grep -iE 'Traceback|Error' -A3 "$OUT/optimizer-step.txt" | head -8
fi
. "$NEW/benchmarks/issue19_trainer_pairs.sh"
part trainer && trainer_pairs
date -u >> "$OUT/card.txt"
