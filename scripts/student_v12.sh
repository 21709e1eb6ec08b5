#!/usr/bin/env bash
# Student v12 (session 18): shapes-sprint v11 continued by two runs on this project's 2-core CPU, side by side (one
# thread each), then the equal-weight mean of their two EMA exports (scripts/weight_average.py). Both are
# configs/shapes-distill-v9-cpu.json (batch 32, lr 2e-4, 100 warm-up steps, sCM + LADD 10 + 1-step regression 30
# onto 4,096 teacher-v6 pairs, EMA 0.999) with student_init v11 and:
#   a   seed 1, 2,000 steps          b   seed 2, regress_features 30, 1,750 steps
# (the shipped runs were stopped at those checkpoints and exported from them; stop_at leaves the schedules alone,
# so stopping there gives the same weights). v11 is restored from git history; the pairs are made if missing
# (~13 min). ~1.9 h on this CPU. Result: $ROOT/soup, a full student folder (v11's folder, timesteps included, with
# the averaged transformer weights); ROOT defaults to runs/v12.
#
#   bash scripts/student_v12.sh            # STOP=N replaces both step counts (a smoke run: STOP=2 ROOT=runs/v12_smoke)
set -eu
START=796379f
ROOT=${ROOT:-runs/v12}
. "$(dirname "$0")/student_cpu_soup.sh"
prepare v11
run a 2000 --seed 1 & p1=$!
run b 1750 --seed 2 --regress-features 30 & p2=$!
wait $p1; wait $p2
stamp "a, b done"
"$PY" scripts/weight_average.py "$INIT" $ROOT/a/export $ROOT/b/export --weights 0,1,1 --out $ROOT/soup
stamp "wrote $ROOT/soup"
