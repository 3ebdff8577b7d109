#!/usr/bin/env bash
# Issue 19, v5 (the trainer's host path): main's trainer ("old") and this branch's ("new") in one call on one GPU,
# with the same bench script (this branch's routerlab/bench/trainer.py, which only adds step-time and idle columns).
# Run from a checkout holding both trees:  OLD=.gpu/speed-old NEW=.gpu/speed-new OUT=dir bash benchmarks/issue19_v5_gpu.sh
set -u
OLD=$(cd "${OLD:?}" && pwd); NEW=$(cd "${NEW:?}" && pwd); SITE=${SITE:-/tmp/site}
cp "$NEW/routerlab/bench/trainer.py" "$OLD/routerlab/bench/trainer.py"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > "$OUT/card.txt" 2>&1; date -u >> "$OUT/card.txt"
for tree in old new; do
  dir=$OLD; [ $tree = new ] && dir=$NEW
  (cd "$dir" && PYTHONPATH=$SITE:$dir timeout 150 python3 -m routerlab.bench.trainer --steps 20 --warmup 5 --compile off \
     --cuda-graph on,off --kernels --json "$OUT/$tree.json") > "$OUT/$tree.txt" 2>&1
  echo "== $tree"; grep -v '^{' "$OUT/$tree.txt" | grep -v Warning | grep -v '_warn_once\|set_sync_debug_mode' | head -60
done
(cd "$NEW" && PYTHONPATH=$SITE:$NEW timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_host_path.py) > "$OUT/tests.txt" 2>&1
tail -3 "$OUT/tests.txt"
