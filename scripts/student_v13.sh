# Student v13: two rounds of CPU continuations on a task-weighted shapes mix (docs/results.md "Session 21").
# configs/shapes-distill-v12-weighted-cpu.json = v12's recipe (batch 32, lr 2e-4, sCM + LADD 10 + 1-step regression
# 30, EMA 0.999, both time embedders frozen) on "shapes:two_object=3,color_attr=3,counting=2,position=2", with
# 4,096 teacher-v6 pairs made on that mix's captions:
#   round 1  from v12 (restored from git history): w11, w12 (seeds 11, 12), 1,500 steps; soup3 = mean(v12, w11, w12)
#   round 2  from soup3, on 4,096 fresh pairs (pairs seed 1): r21, r22 (seeds 21, 22), 1,500 steps;
#            soup = mean(soup3, r21, r22)
# Each round is two one-thread runs side by side (~40 min on this 2-core CPU); the cache and pairs ~8 min.
# Result: $ROOT/soup, a full student folder (v12's folder with the averaged weights, its default timesteps re-chosen
# by scripts/choose_timesteps.py --write, ~2 min).
#
#   bash scripts/student_v13.sh            # STOP=N replaces every step count (a smoke run: STOP=2 ROOT=runs/v13_smoke)
set -eu
START=248fb17
ROOT=${ROOT:-runs/v13}
CONFIG=configs/shapes-distill-v12-weighted-cpu.json
CACHE=runs/cache/shapes-w3322-12000-r64
PAIRS=runs/pairs/v6_20_4k_w3322
PAIRS_SHARD=256
. "$(dirname "$0")/student_cpu_soup.sh"
prepare v12
V12=$INIT
run w11 1500 --seed 11 & p1=$!
run w12 1500 --seed 12 & p2=$!
wait $p1; wait $p2
"$PY" scripts/weight_average.py "$V12" $ROOT/w11/export $ROOT/w12/export --out $ROOT/soup3
stamp "round 1 done: $ROOT/soup3"
pairs ${PAIRS}_s1 1
INIT=$ROOT/soup3
run r21 1500 --seed 21 --pairs ${PAIRS}_s1 & p1=$!
run r22 1500 --seed 22 --pairs ${PAIRS}_s1 & p2=$!
wait $p1; wait $p2
"$PY" scripts/weight_average.py $ROOT/soup3 $ROOT/r21/export $ROOT/r22/export --out $ROOT/soup
stamp "round 2 done: wrote $ROOT/soup"
OMP_NUM_THREADS=1 "$PY" scripts/choose_timesteps.py --model $ROOT/soup --out $ROOT/timesteps.json --write
stamp "timesteps chosen (tuning seed 1) and written to $ROOT/soup/sprint_config.json"
