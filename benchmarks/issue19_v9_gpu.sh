#!/usr/bin/env bash
# Issue 19, v9 on one GPU: the CUDA tests; the router gate's kernels against the cast path (benchmarks/router_gate.py);
# the optimizer step and the gradient norm (benchmarks/optimizer_step.py); the trainer bench of this tree and, when OLD
# names another tree, of that one, in the order new, old, new, old (ROUNDS pairs; pair KERNEL_ROUND, default 1, with
# --kernels).
#   OUT=dir [OLD=.gpu/old] [PARTS="tests gate optimizer trainer"] [ROUNDS=2] bash benchmarks/issue19_v9_gpu.sh
# (docs/benchmarks.md, issue 19 v9)
set -u
PARTS=${PARTS:-tests gate optimizer trainer}
. "$PWD/benchmarks/issue19_gpu_common.sh"
part tests && cuda_tests "tests/test_triton_kernels.py tests/test_adamw.py tests/test_step_graph.py" "${TESTS_K:-not interpreter}"
if part gate; then
  timeout 90 python3 benchmarks/router_gate.py > "$OUT/router-gate.txt" 2>&1; grep -E "^(#|\|)" "$OUT/router-gate.txt"; grep -iE "Traceback|Error" -A3 "$OUT/router-gate.txt" | head -8
fi
if part optimizer; then
  timeout 150 python3 benchmarks/optimizer_step.py > "$OUT/optimizer-step.txt" 2>&1
  grep -E '^\|' "$OUT/optimizer-step.txt"; grep -A4 '"gradient norms"' "$OUT/optimizer-step.txt"; grep -iE 'Traceback|Error' -A3 "$OUT/optimizer-step.txt" | head -8
fi
part trainer && trainer_pairs
date -u >> "$OUT/card.txt"
