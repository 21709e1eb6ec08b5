#!/usr/bin/env bash
# Student v10: shapes-sprint v9 continued towards teacher v6 at batch 256 on one GPU, in the two legs the shipped
# model had (session 16): 570 steps from v9 (configs/shapes-distill-gpu-v10-leg1.json), then 310 steps from the
# first leg's export (-leg2.json). Each leg starts with fresh optimisers, discriminator heads and logvar head.
# v9 is restored from git history; the latent cache is built from the teacher, or unpacked from PACKED (an int8
# cache made by scripts/pack_cache.py, for a machine without text-encoder weights); the 1-step regression pairs
# are made on the GPU from the cache's own text embeddings. Result: runs/gpu/v10_leg2/export (a pipeline folder).
#
#   [PACKED=.gpu/cache12k.npz] [DEVICE=cuda] [NPAIRS=65536] bash scripts/gpu/student_v10.sh    # ~10 min on one H200
#
# STOP1 / STOP2 / SHARD override the legs' step counts (else the configs' stop_at) and the pair shard size
# (a smoke run on a CPU: DEVICE=cpu NPAIRS=16 SHARD=16 STOP1=2 STOP2=2).
#
# The shipped run went through scripts/gpu/continue_distill.sh with wall-clock deadlines (the first leg beside a
# second run, so 6.3 min for 570 steps; the second leg 2.9 min alone), and its second leg saw only the first
# 32,768 of these pairs; the `stop_at` in the two configs replays its step counts. GPU kernels are not
# bit-deterministic, so a rerun gives a close but not identical student.
set -eu
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
NPAIRS=${NPAIRS:-65536}
SHARD=${SHARD:-4096}
CACHE=runs/cache/shapes-12000-r64
V9=runs/student_v9/models/shapes-sprint
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

if [ ! -f "$V9/sprint_config.json" ]; then
  mkdir -p runs/student_v9
  git archive 68109bd models/shapes-sprint | tar -x -C runs/student_v9
fi
if [ ! -f "$CACHE/meta.json" ]; then
  if [ -n "${PACKED:-}" ]; then
    $PY scripts/pack_cache.py unpack "$PACKED" "$CACHE"
  else
    $PY -m sana_sprint.cli distill --config configs/shapes-distill-gpu-v10-leg1.json --prepare-only
  fi
fi
stamp "cache ready"
$PY scripts/teacher_pairs.py --device "$DEVICE" --cached-text --cache "$CACHE" --n "$NPAIRS" \
  --shard "$SHARD" --batch "$SHARD" --threads 4 --out runs/pairs/gpu20
stamp "pairs ready"
$PY -m sana_sprint.cli distill --config configs/shapes-distill-gpu-v10-leg1.json ${STOP1:+--stop-at "$STOP1"}
stamp "leg 1 done"
$PY -m sana_sprint.cli distill --config configs/shapes-distill-gpu-v10-leg2.json ${STOP2:+--stop-at "$STOP2"}
stamp "leg 2 done: runs/gpu/v10_leg2/export"
