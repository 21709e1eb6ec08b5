# Student v17: one round of the session-23 recipe on one GPU, eight seeds averaged (docs/results.md "Session 25").
#   pairs  65,536 repaired from v16's own 1-step images at TrigFlow time 1.2 (10 teacher flow-Euler steps with CFG;
#          pairs seed 9), on the first 5,000 rows of the weighted cache, int8-packed as the device machine got them
#   runs   eight continuations of v16 side by side, configs/shapes-distill-gpu-v16-repair.json (v14's recipe at
#          batch 128), seeds 91-98, 6.85 min each, then resumed from their checkpoints for 3.0 min more (the device
#          tool's 600 s per call; 725-750 steps in all on an H200)
#   soup   the equal-weight mean of the eight EMA exports (v16 not included); then the default timesteps are
#          re-chosen by scripts/choose_timesteps.py --write (~1 min)
# Both stages go through scripts/gpu/repair_round.sh (MODE=train, then MODE=resume), as the shipped run did on the
# `device` tool's H200 with v16 in models/shapes-sprint; here INIT is v16 restored from git history.
#
#   DEVICE=cuda bash scripts/student_v17.sh     # ~14 min on one H200 (DEVICE=cpu takes hours)
#
# The runs stop at wall-clock deadlines, so their step counts depend on the machine; GPU kernels are not
# bit-deterministic either, so a rerun gives a close but not identical student. STOP=N stops every run at step N
# and the resume at 2N (a smoke run: DEVICE=cpu STOP=2 NPAIRS=64 SHARD=32 ROOT=runs/v17_smoke).
set -eu
START=8d29324
ROOT=${ROOT:-runs/v17}
CONFIG=configs/shapes-distill-v13-refine-cpu.json
CACHE=runs/cache/shapes-w3322-12000-r64
NO_PAIRS=1
. "$(dirname "$0")/student_cpu_soup.sh"
prepare v16
V16=$INIT

# GPU round: the weighted cache's first 5,000 rows, packed as the device machine got them
pack_gpu_cache
SEEDS=${SEEDS:-91 92 93 94 95 96 97 98}  # fewer for a smoke run
round=(PY="$PY" DEVICE="${DEVICE:-cuda}" PACKED="$PACKED" INIT="$V16" ROOT="$ROOT/gpu" OUT="$ROOT/gpu_out"
       SEEDS="$SEEDS" COPY="")
T1=585 T2=225
[ -z "${STOP:-}" ] || { T1=400; T2=300; }  # a smoke run: STOP ends the runs, not the deadline
env "${round[@]}" PAIRS_SEED=9 TOTAL=$T1 MARGIN=95 \
  NPAIRS="${NPAIRS:-65536}" SHARD="${SHARD:-4096}" STOP="${STOP:-}" bash scripts/gpu/repair_round.sh
env "${round[@]}" MODE=resume TOTAL=$T2 MARGIN=45 STOP="${STOP:+$((2 * STOP))}" \
  bash scripts/gpu/repair_round.sh
gpu_soup $SEEDS
