# Student v18: one CPU round of the repaired-pairs recipe from v17, several seeds averaged (docs/results.md
# "Session 26"). No GPU: the GPU rounds' config (configs/shapes-distill-gpu-v16-repair.json, batch 128) on this CPU.
#   pairs  8,192 repaired from v17's own 1-step images at TrigFlow time 1.2 (10 teacher flow-Euler steps with CFG;
#          pairs seed 11), on the weighted cache; ~10 min on two threads
#   runs   continuations of v17, seeds $SEEDS (default 121 131 132 141 142), 550 steps each at batch 128, one
#          thread each, two side by side (~64 min a pair on this 2-core CPU)
#   soup   the equal-weight mean of the runs' EMA exports (v17 not included); then the default timesteps are
#          re-chosen by scripts/choose_timesteps.py --write --max-fd-ratio 2=1.1,4=1.1 (~6 min: the 2- and 4-step
#          choices must keep the full-suite FD within 1.1x the teacher's at the tuning seed)
#
#   bash scripts/student_v18.sh      # ~3.5 h on 2 cores; STOP=N stops every run at step N and makes one shard of
#                                    # pairs per process (a smoke run: STOP=2 SEEDS="1 2 3" ROOT=runs/v18_smoke)
# Session 26 ran seed 121 on two threads (session 25's k2) and the others on one; CPU float reductions depend on the
# thread count, so a rerun gives a close but not bit-identical student.
set -eu
START=40607ba
ROOT=${ROOT:-runs/v18}
. "$(dirname "$0")/student_cpu_soup.sh"
# shellcheck disable=SC2086  # SEEDS is a list
cpu_round v17 11 ${SEEDS:-121 131 132 141 142}
