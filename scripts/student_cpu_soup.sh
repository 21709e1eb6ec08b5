# Shared by scripts/student_v11.sh and scripts/student_v12.sh (sourced, not run): continue a student restored from
# git history by several CPU runs of configs/shapes-distill-v9-cpu.json, one thread each, for a weight average.
# The caller sets START (a commit) and ROOT, then calls `prepare NAME` (restores that commit's models/shapes-sprint
# under runs/student_NAME, sets INIT to it, makes the latent cache and the 4,096 teacher-v6 pairs if missing) and
# `run RUN STEPS [flags...]` (STOP=N replaces STEPS; output under $ROOT/RUN, log $ROOT/RUN.log).
# CONFIG, CACHE, PAIRS and PAIRS_SHARD may be set before sourcing (defaults: the v9 CPU recipe on the uniform
# shapes cache with 4,096 pairs); `pairs DIR SEED` makes another 4,096 teacher pairs from CACHE (two processes).
# `repaired DIR T STUDENT SEED` makes 8,192 pairs whose targets are the teacher's repair of STUDENT's own 1-step
# images from TrigFlow time T (scripts/student_v15.sh, student_v18.sh), and `cpu_round NAME PAIRS_SEED SEED...` runs
# one whole CPU round of that recipe from the student at commit START (student_v18.sh).
# For the GPU rounds (scripts/student_v16.sh, student_v17.sh): `pack_gpu_cache` sets PACKED to CACHE's first 5,000
# rows int8-packed as the device machine gets them, and `gpu_soup SEED...` averages $ROOT/gpu/r<SEED>/export into
# $ROOT/soup and writes its default timesteps.
set -eu
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
CONFIG=${CONFIG:-configs/shapes-distill-v9-cpu.json}
CACHE=${CACHE:-runs/cache/shapes-12000-r64}
PAIRS=${PAIRS:-runs/pairs/v6_20_4k}
PAIRS_SHARD=${PAIRS_SHARD:-512}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

prepare() {  # prepare NAME: INIT = runs/student_NAME/models/shapes-sprint, restored from commit $START
  INIT=runs/student_$1/models/shapes-sprint
  if [ ! -f "$INIT/sprint_config.json" ]; then
    mkdir -p "runs/student_$1"
    git archive "$START" models/shapes-sprint | tar -x -C "runs/student_$1"
  fi
  OMP_NUM_THREADS=1 "$BIN/sana-sprint" distill --config "$CONFIG" --prepare-only
  [ -n "${NO_PAIRS:-}" ] || pairs "$PAIRS" 0  # NO_PAIRS=1: the caller makes its own pairs
  mkdir -p "$ROOT"
  stamp "$1, cache and pairs ready"
}

pairs() {  # pairs DIR SEED: 4,096 teacher-v6 samples (20 steps) on CACHE's captions, two shard ranges side by side
  local n=$(( 4096 / PAIRS_SHARD ))  # shards already in DIR are skipped (same seed, same draws)
  local half=$(( n / 2 )) p1 p2
  OMP_NUM_THREADS=1 "$PY" scripts/teacher_pairs.py --teacher models/shapes-teacher --cache "$CACHE" --n 4096 \
    --shard "$PAIRS_SHARD" --seed "$2" --shard-range 0:$half --out "$1" > /dev/null 2>&1 & p1=$!
  OMP_NUM_THREADS=1 "$PY" scripts/teacher_pairs.py --teacher models/shapes-teacher --cache "$CACHE" --n 4096 \
    --shard "$PAIRS_SHARD" --seed "$2" --shard-range $half:$n --out "$1" > /dev/null 2>&1 & p2=$!
  wait $p1; wait $p2
}

run() {  # run NAME STEPS [extra flags...]
  local name=$1 steps=${STOP:-$2}
  shift 2
  OMP_NUM_THREADS=1 "$BIN/sana-sprint" distill --config "$CONFIG" --student-init "$INIT" \
    --out "$ROOT/$name" --export "$ROOT/$name/export" --stop-at "$steps" --no-progress "$@" \
    > "$ROOT/$name.log" 2>&1
}

repaired() {  # repaired DIR T STUDENT SEED: 8,192 targets repaired from time T, two shard ranges side by side
  local r ranges="0:16 16:32"
  [ -z "${STOP:-}" ] || ranges="0:1 16:17"  # a smoke run: one shard per process
  for r in $ranges; do
    OMP_NUM_THREADS=1 "$PY" scripts/teacher_pairs.py --teacher models/shapes-teacher --cache "$CACHE" --n 8192 \
      --shard 256 --seed "$4" --refine-student "$3" --refine-time "$2" --shard-range "$r" --out "$1" > /dev/null 2>&1 &
  done
  wait
}

pack_gpu_cache() {  # PACKED: CACHE's first 5,000 rows, int8-packed (what scripts/gpu/repair_round.sh unpacks)
  PACKED=$ROOT/cache_w3322_5000.npz
  [ -f "$PACKED" ] || "$PY" scripts/pack_cache.py pack "$CACHE" "$PACKED" --rows 5000
}

gpu_soup() {  # gpu_soup SEED...: the equal-weight mean of the GPU runs' EMA exports, then its timesteps re-chosen
  local runs=() s
  for s in "$@"; do runs+=("$ROOT/gpu/r$s/export"); done
  "$PY" scripts/weight_average.py "${runs[@]}" --out $ROOT/soup
  stamp "GPU round done: wrote $ROOT/soup"
  OMP_NUM_THREADS=1 "$PY" scripts/choose_timesteps.py --model $ROOT/soup --out $ROOT/timesteps.json --write
  stamp "timesteps chosen (tuning seed 1) and written to $ROOT/soup/sprint_config.json"
}

cpu_round() {  # cpu_round NAME PAIRS_SEED SEED...: one CPU round of the repaired-pairs recipe from commit START's student
  # (restored as runs/student_NAME): 8,192 pairs repaired from its 1-step images at t 1.2, one run per SEED from it
  # (the GPU rounds' config, 550 steps at batch 128, one thread each, two side by side), the equal-weight mean of the
  # runs' EMA exports in $ROOT/soup (the start not included), then its timesteps re-chosen with the 2- and 4-step FD
  # capped at 1.1x the teacher's
  CONFIG=configs/shapes-distill-v13-refine-cpu.json  # prepare builds the weighted 12,000-sample cache from it
  CACHE=runs/cache/shapes-w3322-12000-r64
  NO_PAIRS=1
  prepare "$1"
  local pseed=$2 exports=() pids p s
  shift 2
  CONFIG=configs/shapes-distill-gpu-v16-repair.json  # the runs: the GPU rounds' config, on CACHE
  repaired $ROOT/pairs 1.2 "$INIT" "$pseed"
  stamp "pairs repaired from $INIT's images ready"
  while [ $# -gt 0 ]; do
    pids=()
    for s in "$1" ${2:-}; do
      run k$s 550 --seed "$s" --pairs $ROOT/pairs --cache "$CACHE" --cache-samples 12000 --device cpu --threads 1 & pids+=($!)
      exports+=("$ROOT/k$s/export")
    done
    for p in "${pids[@]}"; do wait "$p"; done
    stamp "runs ${exports[*]} done"
    shift; [ $# -eq 0 ] || shift
  done
  "$PY" scripts/weight_average.py "${exports[@]}" --out $ROOT/soup
  stamp "wrote $ROOT/soup"
  OMP_NUM_THREADS=1 "$PY" scripts/choose_timesteps.py --model $ROOT/soup --out $ROOT/timesteps.json --write \
    --max-fd-ratio 2=1.1,4=1.1
  stamp "timesteps chosen (tuning seed 1) and written to $ROOT/soup/sprint_config.json"
}
