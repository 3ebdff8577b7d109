#!/usr/bin/env bash
# Issue 19, v5 + v6 on one GPU: the optimizer step alone (benchmarks/optimizer_step.py), the CUDA tests, the trainer
# bench for this tree with routerlab's Triton AdamW and with torch's fused AdamW (graphed and eager), two 40-step runs
# of the 25M preset (the same two optimizers), and, when OLD names a second tree, the same bench on it (graphed).
# From the checkout to measure, OLD an export of another commit (git archive be8ce91 | tar -x -C .gpu/old):
#   NEW=. [OLD=.gpu/old] OUT=dir bash benchmarks/issue19_v6_gpu.sh      (docs/benchmarks.md, issue 19 v6)
set -u
NEW=$(cd "${NEW:?}" && pwd); SITE=${SITE:-/tmp/site}
[ -n "${OLD:-}" ] && OLD=$(cd "$OLD" && pwd)
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > "$OUT/card.txt" 2>&1; date -u >> "$OUT/card.txt"
cd "$NEW"
PYTHONPATH=$SITE:$NEW timeout 150 python3 benchmarks/optimizer_step.py > "$OUT/optimizer.txt" 2>&1; grep '^|' "$OUT/optimizer.txt"
grep -A4 agreement "$OUT/optimizer.txt"
PYTHONPATH=$SITE:$NEW timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_adamw.py tests/test_host_path.py tests/test_step_graph.py > "$OUT/tests.txt" 2>&1
tail -3 "$OUT/tests.txt"
bench() {  # tree, its directory, timeout, bench flags
  (cd "$2" && PYTHONPATH=$SITE:$2 timeout "$3" python3 -m routerlab.bench.trainer --steps 20 --warmup 5 --compile off --kernels \
     --json "$OUT/$1.json" "${@:4}") > "$OUT/$1.txt" 2>&1
  echo "== $1"; grep '^|' "$OUT/$1.txt" | grep -v 'host during stalls' | head -60
}
bench new "$NEW" 330 --cuda-graph on,off --optimizer-kernel triton,torch
for opt in triton torch; do
  PYTHONPATH=$SITE:$NEW timeout 60 python3 -m routerlab train -c configs/gpu/stdlib-25m-e8k2.yaml --no-progress --set train.steps=40 \
    --set train.optimizer_kernel=$opt --set run.dir=/tmp/runs-$opt --set run.checkpoint=false > "$OUT/25m-$opt.txt" 2>&1
  echo "== 25M $opt"; grep -E "│ (loss|loss_se|tokens_per_s|step_time_ms|train_loss) " "$OUT/25m-$opt.txt"; grep -i "error\|warn" "$OUT/25m-$opt.txt" | head -3
done
if [ -n "${OLD:-}" ]; then
  cp "$NEW/routerlab/bench/trainer.py" "$OLD/routerlab/bench/trainer.py"
  bench old "$OLD" 110 --cuda-graph on
fi
date -u >> "$OUT/card.txt"
