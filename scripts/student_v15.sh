# Student v15: two rounds of CPU continuations whose 1-step regression targets are the teacher's repair of the
# student's own 1-step images (docs/results.md "Session 23").
#   pairs   8,192 per set: scripts/teacher_pairs.py --refine-student S --refine-time T (S's 1-step latent from the
#           pair's noise, re-noised to TrigFlow time T, then 10 teacher flow Euler steps with CFG); ~8 min a set on
#           two threads
#   runs    configs/shapes-distill-v13-refine-cpu.json (v14's recipe: refine 30 at t_r 0.6, regression weight 30),
#           1,200 steps, one thread each (~35 min for two side by side)
#   round 1 from v14: a2 on pairs repaired from t 1.0 (pairs seed 5, seed 52), a3 on pairs from t 1.2 (pairs seed
#           5, seed 53); c1 = mean(v14, a2, a3)
#   round 2 from c1: b1 on pairs repaired from c1's own images at t 1.2 (pairs seed 6, seed 61); soup = mean(c1, b1)
#   then the default timesteps are re-chosen by scripts/choose_timesteps.py --write (~2 min)
#
#   bash scripts/student_v15.sh            # STOP=N replaces every step count (a smoke run: STOP=2 ROOT=runs/v15_smoke)
set -eu
START=6e37d13
ROOT=${ROOT:-runs/v15}
CONFIG=configs/shapes-distill-v13-refine-cpu.json
CACHE=runs/cache/shapes-w3322-12000-r64
NO_PAIRS=1
. "$(dirname "$0")/student_cpu_soup.sh"
prepare v14
V14=$INIT

repaired $ROOT/pairs_t10 1.0 "$V14" 5
repaired $ROOT/pairs_t12 1.2 "$V14" 5
stamp "repaired pairs ready"
run a2 1200 --seed 52 --pairs $ROOT/pairs_t10 & p1=$!
run a3 1200 --seed 53 --pairs $ROOT/pairs_t12 & p2=$!
wait $p1; wait $p2
"$PY" scripts/weight_average.py "$V14" $ROOT/a2/export $ROOT/a3/export --out $ROOT/c1
stamp "round 1 done: $ROOT/c1"
repaired $ROOT/pairs_c1_t12 1.2 $ROOT/c1 6
INIT=$ROOT/c1
run b1 1200 --seed 61 --pairs $ROOT/pairs_c1_t12
"$PY" scripts/weight_average.py $ROOT/c1 $ROOT/b1/export --out $ROOT/soup
stamp "round 2 done: wrote $ROOT/soup"
OMP_NUM_THREADS=1 "$PY" scripts/choose_timesteps.py --model $ROOT/soup --out $ROOT/timesteps.json --write
stamp "timesteps chosen (tuning seed 1) and written to $ROOT/soup/sprint_config.json"
