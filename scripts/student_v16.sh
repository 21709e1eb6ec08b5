# Student v16: one round of the session-23 recipe on one GPU, five seeds averaged (docs/results.md "Session 24").
#   pairs  65,536 repaired from v15's own 1-step images at TrigFlow time 1.2 (10 teacher flow-Euler steps with CFG;
#          pairs seed 8), on the first 5,000 rows of the weighted cache, int8-packed as the device machine got them
#   runs   five continuations of v15 side by side, configs/shapes-distill-gpu-v16-repair.json (v14's recipe at
#          batch 128), seeds 81-85 (84 and 85 with TF32 matrix products), 6.07 min each (~550 steps on an H200)
#   soup   the equal-weight mean of the five EMA exports (v15 not included); then the default timesteps are
#          re-chosen by scripts/choose_timesteps.py --write (~1 min)
# Both stages go through scripts/gpu/repair_round.sh, as the shipped run did on the `device` tool's H200 (one call,
# 466 s, with v15 in models/shapes-sprint); here INIT is v15 restored from git history.
#
#   DEVICE=cuda bash scripts/student_v16.sh     # ~8 min on one H200 (DEVICE=cpu takes hours)
#
# The runs stop at a wall-clock deadline, so their step counts depend on the machine; GPU kernels are not
# bit-deterministic either, so a rerun gives a close but not identical student. STOP=N stops every run at step N
# (a smoke run: DEVICE=cpu STOP=2 NPAIRS=64 SHARD=32 ROOT=runs/v16_smoke).
set -eu
START=cf9d8ad
ROOT=${ROOT:-runs/v16}
CONFIG=configs/shapes-distill-v13-refine-cpu.json
CACHE=runs/cache/shapes-w3322-12000-r64
NO_PAIRS=1
. "$(dirname "$0")/student_cpu_soup.sh"
prepare v15
V15=$INIT

# GPU round: the weighted cache's first 5,000 rows, packed as the device machine got them
pack_gpu_cache
GPU_SECONDS=${STOP:+400}  # a smoke run: STOP ends the runs, not the deadline
PY="$PY" DEVICE="${DEVICE:-cuda}" PACKED="$PACKED" INIT="$V15" ROOT="$ROOT/gpu" OUT="$ROOT/gpu_out" \
  TOTAL="${GPU_SECONDS:-540}" MARGIN=100 NPAIRS="${NPAIRS:-65536}" SHARD="${SHARD:-4096}" SEEDS="81 82 83 84 85" \
  TF32_SEEDS="84 85" STOP="${STOP:-}" bash scripts/gpu/repair_round.sh
gpu_soup 81 82 83 84 85
