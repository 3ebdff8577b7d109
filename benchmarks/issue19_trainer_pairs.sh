# Sourced by benchmarks/issue19_v9_gpu.sh and issue19_v10_gpu.sh (set: SITE, NEW, OUT; OLD optional): `trainer_pairs`
# runs the trainer bench (python3 -m routerlab.bench.trainer, graphed, compile off) of the tree in NEW and, when OLD
# names another tree, of that one with NEW's bench file, in the order new, old, new, old: ROUNDS pairs (2), pair
# KERNEL_ROUND (1; 0: none) with --kernels, STEPS timed steps (40), statistics logged every LOG_EVERY steps (10).
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
