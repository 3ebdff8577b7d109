# Sourced by benchmarks/issue19_v9_gpu.sh and issue19_v10_gpu.sh, with OUT set (OLD, PARTS, SITE optional): the setup
# they share (PYTHONPATH, NEW = this tree, OLD made absolute, `part NAME`, the card's first lines), `cuda_tests FILES K`
# (the CUDA tests of FILES selected by -k K) and `trainer_pairs`: the trainer bench (python3 -m routerlab.bench.trainer,
# graphed, compile off) of NEW and, when OLD names another tree, of that one with NEW's bench file, in the order new,
# old, new, old: ROUNDS pairs (2), pair KERNEL_ROUND (1; 0: none) with --kernels, STEPS timed steps (40), statistics
# logged every LOG_EVERY steps (10).
SITE=${SITE:-/tmp/site}; NEW=$PWD; export PYTHONPATH=$SITE:$PWD
[ -n "${OLD:-}" ] && OLD=$(cd "$OLD" && pwd)
part() { [[ " $PARTS " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > "$OUT/card.txt" 2>&1; date -u >> "$OUT/card.txt"
cuda_tests() {  # test files, -k expression
  timeout 240 python3 -m pytest -q -p no:cacheprovider $1 -k "$2" > "$OUT/tests.txt" 2>&1
  grep -E "^E |Error|assert" "$OUT/tests.txt" | head -20; tail -3 "$OUT/tests.txt"
}
bench() {  # name, tree, timeout, bench flags
  (cd "$2" && PYTHONPATH=$SITE:$2 timeout "$3" python3 -m routerlab.bench.trainer --warmup 5 --compile off --cuda-graph on \
     --steps ${STEPS:-40} --log-every ${LOG_EVERY:-10} --json "$OUT/$1.json" "${@:4}") > "$OUT/$1.txt" 2>&1
  echo "== $1"; grep '^|' "$OUT/$1.txt" | grep -v 'host during stalls\|host inside' | head -40; grep -iE 'Traceback|Error' -A3 "$OUT/$1.txt" | head -8
}
trainer_pairs() {
  [ -n "${OLD:-}" ] && cp "$NEW/routerlab/bench/trainer.py" "$OLD/routerlab/bench/trainer.py"  # the same bench and kernel parts
  for round in $(seq 1 "${ROUNDS:-2}"); do
    flags=""; [ "$round" = "${KERNEL_ROUND:-1}" ] && flags="--kernels"
    bench "trainer-new-$round" "$NEW" 300 $flags
    [ -n "${OLD:-}" ] && bench "trainer-old-$round" "$OLD" 300 $flags
  done
}
