#!/usr/bin/env bash
# Issue 19, v10 on one GPU: the CUDA tests; the layer's fast path against the loop (routerlab.bench.core.check_correctness);
# the MoE layer's small work (benchmarks/moe_small_ops.py); the trainer bench of this tree and, when OLD names another
# tree, of that one, in the order new, old, new, old (ROUNDS pairs; pair KERNEL_ROUND, default 1, with --kernels),
# statistics logged every LOG_EVERY steps (10; the presets' own is 50).
#   OUT=dir [OLD=.gpu/old] [PARTS="tests small trainer"] [TESTS="test files"] [ROUNDS=2] [LOG_EVERY=10] [STEPS=40] bash benchmarks/issue19_v10_gpu.sh
# (docs/benchmarks.md, issue 19 v10)
set -u
PARTS=${PARTS:-tests small trainer}
. "$PWD/benchmarks/issue19_gpu_common.sh"
if part tests; then
  cuda_tests "${TESTS:-tests/test_triton_kernels.py tests/test_adamw.py tests/test_step_graph.py tests/test_host_path.py}" \
    "${TESTS_K:-not interpreter and not hopper}"
  timeout 60 python3 -c "import torch; from routerlab.bench.core import check_correctness as c; print('fast path vs loop, bf16:', c(torch.device('cuda'), seed=0))" \
    > "$OUT/correctness.txt" 2>&1; tail -3 "$OUT/correctness.txt"
fi
if part small; then
  timeout 150 python3 benchmarks/moe_small_ops.py > "$OUT/moe-small-ops.txt" 2>&1; grep -E "^(#|\|)" "$OUT/moe-small-ops.txt"
  grep -iE "Traceback|Error" -A3 "$OUT/moe-small-ops.txt" | head -8
fi
part trainer && trainer_pairs
date -u >> "$OUT/card.txt"
