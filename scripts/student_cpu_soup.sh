# Shared by scripts/student_v11.sh and scripts/student_v12.sh (sourced, not run): continue a student restored from
# git history by several CPU runs of configs/shapes-distill-v9-cpu.json, one thread each, for a weight average.
# The caller sets START (a commit) and ROOT, then calls `prepare NAME` (restores that commit's models/shapes-sprint
# under runs/student_NAME, sets INIT to it, makes the latent cache and the 4,096 teacher-v6 pairs if missing) and
# `run RUN STEPS [flags...]` (STOP=N replaces STEPS; output under $ROOT/RUN, log $ROOT/RUN.log).
set -eu
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
PAIRS=runs/pairs/v6_20_4k
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

prepare() {  # prepare NAME: INIT = runs/student_NAME/models/shapes-sprint, restored from commit $START
  INIT=runs/student_$1/models/shapes-sprint
  if [ ! -f "$INIT/sprint_config.json" ]; then
    mkdir -p "runs/student_$1"
    git archive "$START" models/shapes-sprint | tar -x -C "runs/student_$1"
  fi
  OMP_NUM_THREADS=1 "$BIN/sana-sprint" distill --config configs/shapes-distill-v9-cpu.json --prepare-only
  if [ ! -f "$PAIRS/pairs-00007.pt" ]; then
    OMP_NUM_THREADS=1 "$PY" scripts/teacher_pairs.py --teacher models/shapes-teacher --cache runs/cache/shapes-12000-r64 \
      --n 4096 --shard 512 --out "$PAIRS"
  fi
  mkdir -p "$ROOT"
  stamp "$1, cache and pairs ready"
}

run() {  # run NAME STEPS [extra flags...]
  local name=$1 steps=${STOP:-$2}
  shift 2
  OMP_NUM_THREADS=1 "$BIN/sana-sprint" distill --config configs/shapes-distill-v9-cpu.json --student-init "$INIT" \
    --out "$ROOT/$name" --export "$ROOT/$name/export" --stop-at "$steps" --no-progress "$@" \
    > "$ROOT/$name.log" 2>&1
}
