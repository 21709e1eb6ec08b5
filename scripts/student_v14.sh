# Student v14: two rounds of CPU continuations of v13 with the self-refinement term (docs/results.md "Session 22").
# configs/shapes-distill-v13-refine-cpu.json = v13's recipe (batch 32, lr 2e-4, sCM + LADD 10 + 1-step regression
# 30, EMA 0.999, both time embedders frozen, task-weighted mix "shapes:two_object=3,color_attr=3,counting=2,position=2")
# plus refine_weight 30 at refine_time 0.6 on 16 fresh-noise samples per step:
#   round 1  from v13 (restored from git history), pairs seed 2, training seed 31 for both runs, 1,200 steps:
#            f30 (the config) and f100t3 (refine_weight 100, refine_time 0.3); s1 = mean(v13, f30, f100t3)
#   round 2  from s1, 1,200 steps: g1 (seed 41, pairs seed 0), g2 (seed 42, refine_weight 60, pairs seed 1);
#            soup = mean(s1, g1, g2)
# Each round is two one-thread runs side by side (~35 min on this 2-core CPU); the cache and pairs ~10 min.
# Result: $ROOT/soup, a full student folder (v13's folder with the averaged weights, its default timesteps re-chosen
# by scripts/choose_timesteps.py --write, ~2 min).
#
#   bash scripts/student_v14.sh            # STOP=N replaces every step count (a smoke run: STOP=2 ROOT=runs/v14_smoke)
set -eu
START=6ba04ab
ROOT=${ROOT:-runs/v14}
CONFIG=configs/shapes-distill-v13-refine-cpu.json
CACHE=runs/cache/shapes-w3322-12000-r64
PAIRS=runs/pairs/v6_20_4k_w3322
PAIRS_SHARD=256
. "$(dirname "$0")/student_cpu_soup.sh"
prepare v13
V13=$INIT
pairs ${PAIRS}_s1 1
pairs ${PAIRS}_s2 2
run f30 1200 --seed 31 --pairs ${PAIRS}_s2 & p1=$!
run f100t3 1200 --seed 31 --pairs ${PAIRS}_s2 --refine-weight 100 --refine-time 0.3 & p2=$!
wait $p1; wait $p2
"$PY" scripts/weight_average.py "$V13" $ROOT/f30/export $ROOT/f100t3/export --out $ROOT/s1
stamp "round 1 done: $ROOT/s1"
INIT=$ROOT/s1
run g1 1200 --seed 41 --pairs $PAIRS & p1=$!
run g2 1200 --seed 42 --pairs ${PAIRS}_s1 --refine-weight 60 & p2=$!
wait $p1; wait $p2
"$PY" scripts/weight_average.py $ROOT/s1 $ROOT/g1/export $ROOT/g2/export --out $ROOT/soup
stamp "round 2 done: wrote $ROOT/soup"
OMP_NUM_THREADS=1 "$PY" scripts/choose_timesteps.py --model $ROOT/soup --out $ROOT/timesteps.json --write
stamp "timesteps chosen (tuning seed 1) and written to $ROOT/soup/sprint_config.json"
