#!/usr/bin/env bash
# Train on one GPU machine that has no text encoder and little room for data: unpack an int8-packed latent
# cache (scripts/pack_cache.py), make teacher pairs from the cache's own embeddings (distillation runs), then
# train the given configs side by side (one process each, same GPU) until a wall-clock deadline.
#
#   [CACHE_DIR=runs/cache/shapes-12000-r64] [NPAIRS=65536] \
#   scripts/gpu/continue_distill.sh PACKED.npz TOTAL_SECONDS RUN.json [RUN.json ...]
#
# A RUN.json with a "teacher" key is a distill config (e.g. student_init, pairs runs/pairs/gpu20), any other a
# train-teacher config (e.g. init, cache CACHE_DIR; NPAIRS=0 skips the pairs). Every run gets max_minutes =
# what is left of TOTAL_SECONDS (minus MARGIN seconds for export) when it starts. Results: for each run,
# $OUT/<name>.tar = export/transformer + export/sprint_config.json + metrics.jsonl + config.json, <name> the
# folder above the config's export folder. SEEDS="0 1 2 3" runs every config once per seed, side by side (out and
# export become <out>-s<seed> and <out>-s<seed>/export), for a weight average of the exports afterwards
# (scripts/weight_average.py; docs/results.md "Session 18"; score each export alone first, "Session 19").
# Made for the `device` tool (PYTHONPATH with the carried diffusers wheel); any CUDA machine works.
set -u
if [ $# -lt 3 ]; then
  echo "usage: $0 PACKED.npz TOTAL_SECONDS RUN.json [RUN.json ...]" >&2
  exit 2
fi
T0=$(date +%s)
PACKED=$1; TOTAL=$2; shift 2
OUT=${OUT:-runs/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
NPAIRS=${NPAIRS:-65536}
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
# "<command> <out folder> <export folder>" of a run config
describe() {
  $PY -c "import json, sys; c = json.load(open(sys.argv[1])); out = c['out']; \
print('distill' if 'teacher' in c else 'train-teacher', out, c.get('export') or out + '/export')" "$1"
}

$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
CACHE_DIR=${CACHE_DIR:-runs/cache/shapes-12000-r64}
if [ ! -f "$CACHE_DIR/meta.json" ]; then
  $PY scripts/pack_cache.py unpack "$PACKED" "$CACHE_DIR" || exit 1
fi
echo "[$(($(date +%s)-T0)) s] cache ready"
if [ "$NPAIRS" -gt 0 ]; then
  # pairs: as many whole shards as fit in PAIRS_SECONDS (shards are written atomically; distill reads all present)
  timeout "${PAIRS_SECONDS:-120}" $PY scripts/teacher_pairs.py --device "${PAIRS_DEVICE:-cuda}" --cached-text \
    --cache "$CACHE_DIR" --n "$NPAIRS" --shard "${SHARD:-4096}" --batch "${SHARD:-4096}" --threads 4 \
    --out runs/pairs/gpu20 2>&1 | tr '\r' '\n' | tail -n 2
  echo "[$(($(date +%s)-T0)) s] pairs: $(ls runs/pairs/gpu20/pairs-*.pt 2>/dev/null | wc -l) shards"
fi

MARGIN=${MARGIN:-60}
pids=(); names=(); outs=(); exports=()
for cfg in "$@"; do
  read -r cmd out0 exp0 < <(describe "$cfg") || exit 2
  for seed in ${SEEDS:--}; do
    out=$out0; exp=$exp0; extra=()
    if [ "$seed" != "-" ]; then
      out=$out0-s$seed; exp=$out/$(basename "$exp0")
      extra=(--seed "$seed" --out "$out" --export "$exp")
    fi
    name=$(basename "$(dirname "$exp")")
    mins=$($PY -c "print(max(0.5, ($(left) - $MARGIN) / 60))")
    echo "[$(($(date +%s)-T0)) s] start $name ($cmd${extra[*]:+ ${extra[*]}}) for $mins min"
    $PY -m sana_sprint.cli "$cmd" --config "$cfg" --max-minutes "$mins" "${extra[@]}" > "$OUT/$name.log" 2>&1 &
    pids+=($!); names+=("$name"); outs+=("$out"); exports+=("$exp")
  done
done
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; rc=$?
  name=${names[$i]}; out=${outs[$i]}; exp=${exports[$i]}
  echo "[$(($(date +%s)-T0)) s] $name exited $rc"
  tail -n 3 "$OUT/$name.log" | tr '\r' '\n' | tail -n 3
  echo "  checkpoints: $(ls "$out/checkpoints" 2>/dev/null | tr '\n' ' ')"
  [ -f "$out/metrics.jsonl" ] && tail -n 1 "$out/metrics.jsonl"
  if [ -d "$exp/transformer" ]; then  # the tar holds export/..., metrics.jsonl, config.json
    stage=$(mktemp -d); mkdir "$stage/export"
    cp -r "$exp/transformer" "$exp/sprint_config.json" "$stage/export/"
    for f in metrics.jsonl config.json; do [ -f "$out/$f" ] && cp "$out/$f" "$stage/"; done
    tar -cf "$OUT/$name.tar" -C "$stage" . && rm -rf "$stage"
  fi
done
ls -la "$OUT"
