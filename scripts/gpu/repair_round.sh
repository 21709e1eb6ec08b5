#!/usr/bin/env bash
# One round of the session-23 recipe on one GPU machine, for a weight average made afterwards: the teacher's repair
# of a student's own 1-step images as 1-step regression targets (scripts/teacher_pairs.py --refine-student), then
# several continuations of that student on them side by side (one process each, same GPU), until a wall-clock
# deadline. Made for the `device` tool (no text encoder there, a size limit on what travels): the latent cache
# comes as an int8 file (scripts/pack_cache.py pack ... --rows 5000), diffusers as a zip put on PYTHONPATH.
#
#   [PACKED=.gpu/cache_w3322_5000.npz] [DIFFUSERS_ZIP=.gpu/diffusers_trim.zip] [SEEDS="81 82 83 84 85"] \
#   [TF32_SEEDS="84 85"] [TOTAL=540] [MARGIN=100] bash scripts/gpu/repair_round.sh
#
# TOTAL is the seconds the whole script may take; each run gets what is left after the pairs, less MARGIN (a run
# also spends ~25 s loading and exporting on an H200 beside four others). Preparing .gpu/ (ignored by git, named in
# the device tool's `carry`): `python scripts/pack_cache.py pack runs/cache/shapes-w3322-12000-r64
# .gpu/cache_w3322_5000.npz --rows 5000` and scripts/gpu/pack_diffusers.py (its header); the whole cache would put
# the working tree over the tool's 64 MiB. Session 24 (v16) ran exactly the defaults with SEEDS="81 82 83 84 85"
# TF32_SEEDS="84 85": 466 s.
#
# INIT (default models/shapes-sprint) is the student continued and repaired; T_REPAIR (1.2) the TrigFlow time its
# images are re-noised to; NPAIRS (65,536) pairs with seed PAIRS_SEED (8); CONFIG the run recipe
# (configs/shapes-distill-gpu-v16-repair.json: v14's CPU recipe at batch 128). Runs whose seed is in TF32_SEEDS let
# float32 matrix products use TF32 (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1); the others run in plain float32, as on a CPU.
# Results in $OUT: r<seed>.safetensors (each run's EMA transformer, fp16, the export's weights) and logs.tar (logs,
# metrics.jsonl, the pairs' meta.json); COPY (default: all of SEEDS) names the runs whose weights go there, since
# the tool brings back at most 64 MiB per call (five students).
#
# One call may run 600 s, the session's device time is 900 s, and the machine keeps its files while warm, so a
# round can take two calls: MODE=resume continues every run of SEEDS from its last checkpoint (its own config,
# optimisers and EMA; no new pairs) for TOTAL - MARGIN more seconds, and MODE=fetch only copies the COPY runs'
# weights to $OUT. Session 25 (v17), from v16 in models/shapes-sprint, one call after another:
#   PAIRS_SEED=9 SEEDS="91 92 93 94 95 96 97 98" TOTAL=585 MARGIN=95 COPY="" bash scripts/gpu/repair_round.sh   # 516 s
#   MODE=resume SEEDS="91 92 93 94 95 96 97 98" TOTAL=225 MARGIN=45 COPY="91 92 93 94" bash scripts/gpu/repair_round.sh
#   MODE=fetch COPY="95 96 97 98" bash scripts/gpu/repair_round.sh
# (the session ran the first with every run's weights in $OUT, and the other two as the equivalent commands by hand:
# resume for 3.0 min, 208 s in all; 725-750 steps per run). A smoke run on a CPU:
#   DEVICE=cpu NPAIRS=64 SHARD=32 STOP=2 SEEDS="81 82" OUT=runs/gpu_smoke/out ROOT=runs/gpu_smoke bash scripts/gpu/repair_round.sh
set -u
T0=$(date +%s)
TOTAL=${TOTAL:-540}
OUT=${OUT:-runs/gpu_out}
ROOT=${ROOT:-runs/gpu/repair_round}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
PACKED=${PACKED:-.gpu/cache_w3322_5000.npz}
DIFFUSERS_ZIP=${DIFFUSERS_ZIP:-.gpu/diffusers_trim.zip}
CACHE=${CACHE:-runs/cache/gpu-w3322-5000-r64}
CONFIG=${CONFIG:-configs/shapes-distill-gpu-v16-repair.json}
INIT=${INIT:-models/shapes-sprint}
T_REPAIR=${T_REPAIR:-1.2}
PAIRS_SEED=${PAIRS_SEED:-8}
NPAIRS=${NPAIRS:-65536}
SHARD=${SHARD:-4096}
SEEDS=${SEEDS:-81 82 83 84 85}
TF32_SEEDS=${TF32_SEEDS:-}
MARGIN=${MARGIN:-100}
MODE=${MODE:-train}
case $MODE in train|resume|fetch) ;; *) echo "MODE must be train, resume or fetch, got $MODE" >&2; exit 2 ;; esac
export PYTHONUNBUFFERED=1
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
mkdir -p "$OUT" "$ROOT"

if [ "$MODE" != fetch ]; then  # fetch only copies what an earlier call left on the machine
  if [ -f "$DIFFUSERS_ZIP" ] && ! $PY -c "import diffusers" 2>/dev/null; then
    $PY -m zipfile -e "$DIFFUSERS_ZIP" /tmp/site || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
  $PY -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, \
  'transformers', transformers.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
  if [ ! -f "$CACHE/meta.json" ]; then
    $PY scripts/pack_cache.py unpack "$PACKED" "$CACHE" || exit 1
  fi
  stamp "cache ready"
fi

PAIRS=$ROOT/pairs
if [ "$MODE" = train ]; then
  pairs_args=(--device "$DEVICE" --cached-text --cache "$CACHE" --n "$NPAIRS" --shard "$SHARD" --batch "$SHARD" \
    --threads 4 --seed "$PAIRS_SEED")
  timeout "${PAIRS_SECONDS:-120}" $PY scripts/teacher_pairs.py "${pairs_args[@]}" --refine-student "$INIT" \
    --refine-time "$T_REPAIR" --out "$PAIRS" > "$ROOT/pairs.log" 2>&1
  tail -n 3 "$ROOT/pairs.log" | tr '\r' '\n' | tail -n 3
  if ! ls "$PAIRS"/pairs-*.pt > /dev/null 2>&1; then  # no repaired pairs: fall back to the teacher's own samples
    stamp "no repaired pairs; plain teacher pairs instead"
    PAIRS=$ROOT/pairs_plain
    timeout 60 $PY scripts/teacher_pairs.py "${pairs_args[@]}" --out "$PAIRS" > "$ROOT/pairs_plain.log" 2>&1
    tail -n 3 "$ROOT/pairs_plain.log" | tr '\r' '\n' | tail -n 3
  fi
  stamp "pairs: $(ls "$PAIRS"/pairs-*.pt 2>/dev/null | wc -l) shards in $PAIRS"
fi

if [ "$MODE" != fetch ]; then
  mins=$($PY -c "print(max(0.2, ($(left) - $MARGIN) / 60))")
  pids=()
  for s in $SEEDS; do
    tf32=0
    case " $TF32_SEEDS " in *" $s "*) tf32=1 ;; esac
    if [ "$MODE" = resume ]; then  # the run's own config (pairs, seed, out, export) and its last checkpoint
      [ -f "$ROOT/r$s/config.json" ] || { stamp "r$s: no run to resume in $ROOT/r$s"; continue; }
      args=(--config "$ROOT/r$s/config.json" --resume)
    else
      args=(--config "$CONFIG" --device "$DEVICE" --student-init "$INIT" --pairs "$PAIRS" --seed "$s"
            --out "$ROOT/r$s" --export "$ROOT/r$s/export")
    fi
    stamp "$MODE r$s (tf32 $tf32) for $mins min"
    TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=$tf32 OMP_NUM_THREADS=2 $PY -m sana_sprint.cli distill "${args[@]}" \
      --max-minutes "$mins" ${STOP:+--stop-at "$STOP"} >> "$ROOT/r$s.log" 2>&1 &
    pids+=("$s:$!")
  done
  for sp in "${pids[@]}"; do
    s=${sp%%:*}
    wait "${sp#*:}"; rc=$?
    stamp "r$s exited $rc; $(tail -n 1 "$ROOT/r$s/metrics.jsonl" 2>/dev/null | cut -c 1-400)"
    [ $rc -eq 0 ] || tail -n 15 "$ROOT/r$s.log"
  done
fi

# the device tool brings back at most 64 MiB from $OUT: five fp16 students (10.9 MB each) and the logs; the
# rest stay in $ROOT/r<seed>/export for a MODE=fetch call while the machine is still warm
for s in ${COPY-$SEEDS}; do
  w=$ROOT/r$s/export/transformer/diffusion_pytorch_model.safetensors
  if [ -f "$w" ]; then cp "$w" "$OUT/r$s.safetensors"; else stamp "r$s: no exported weights"; fi
done
tar -cf "$OUT/logs.tar" "$ROOT"/*.log "$ROOT"/r*/metrics.jsonl "$ROOT"/r*/config.json "$PAIRS/meta.json" 2>/dev/null
ls -la "$OUT"
stamp "done"
