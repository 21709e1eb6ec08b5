#!/usr/bin/env bash
# Student v11 (session 17): shapes-sprint v10 continued by four runs on this project's 2-core CPU, then the
# equal-weight mean of their four EMA exports (scripts/weight_average.py). All four are
# configs/shapes-distill-v9-cpu.json (batch 32, lr 2e-4, 100 warm-up steps, sCM + LADD 10 + 1-step regression 30
# onto 4,096 teacher-v6 pairs, EMA 0.999) with student_init v10 and, each:
#   ctl    the same recipe, 1,599 steps          l3      ladd_weight 3, 1,599 steps
#   feat   regress_features 30, 1,599 steps      feat90  regress_features 90, 1,175 steps
# (the shipped runs' step counts: session 16's two stopped at their 85-minute limit, feat90 at its 76-minute one).
# v10 is restored from git history; the pairs are made if missing (~13 min). Two runs at a time, one thread each:
# ~3.3 h on this CPU. Result: $ROOT/soup (a full student folder; ROOT defaults to runs/v11).
#
#   bash scripts/student_v11.sh            # STOP=N replaces every run's step count; ROOT= another output folder
#                                          # (a smoke run: STOP=2 ROOT=runs/v11_smoke; runs resume from ROOT's checkpoints)
set -eu
START=bb457fb
ROOT=${ROOT:-runs/v11}
. "$(dirname "$0")/student_cpu_soup.sh"
prepare v10
run ctl 1599 & p1=$!
run l3 1599 --ladd-weight 3 & p2=$!
wait $p1; wait $p2
stamp "ctl, l3 done"
run feat 1599 --regress-features 30 & p1=$!
run feat90 1175 --regress-features 90 & p2=$!
wait $p1; wait $p2
stamp "feat, feat90 done"
"$PY" scripts/weight_average.py $ROOT/ctl/export $ROOT/l3/export $ROOT/feat/export $ROOT/feat90/export \
  --out $ROOT/soup
stamp "wrote $ROOT/soup"
