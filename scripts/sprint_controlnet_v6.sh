# Sprint-ControlNet v6: the shipped Sprint-ControlNet v5 moved onto student v17 (docs/results.md "Session 25").
# v5 was distilled onto student v5 long ago; on each later student its 1-step edge F1 fell (0.885 on v5, 0.833 on
# v17, issue 7's floor being 0.9 x the teacher pair's 0.925). Distilling anew from the ControlNet teacher onto v17
# did worse (0.827), so this continues v5 itself on v17: configs/shapes-sprint-controlnet-v6-init.json, i.e. the
# Sprint-ControlNet recipe (teacher v6 + ControlNet v5 at scale 1.5, frozen student base, batch 32) started from
# v5's weights (--controlnet-init), 50 warm-up steps, no tangent warm-up. Then the default conditioning scales are
# chosen on the tuning scenes (scripts/choose_conditioning_scale.py --write).
#
#   bash scripts/sprint_controlnet_v6.sh        # ~20 min for 600 steps on one thread of this CPU, plus ~2 min of scales
#
# v5 and v17 are restored from git history (COMMIT), so the script does not depend on what models/ holds now.
# STOP=N stops at step N (a smoke run: STOP=2 ROOT=runs/scn6_smoke).
set -eu
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
COMMIT=c1f98e9  # models/: student v17, Sprint-ControlNet v5
ROOT=${ROOT:-runs/sprint_controlnet_v6_init}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
mkdir -p "$ROOT"
[ -f "$ROOT/models/shapes-sprint-controlnet/controlnet_config.json" ] ||
  git archive "$COMMIT" models/shapes-sprint models/shapes-sprint-controlnet | tar -x -C "$ROOT"
OMP_NUM_THREADS=1 "$BIN/sana-sprint" distill --config configs/shapes-sprint-controlnet-v6-init.json \
  --student-init "$ROOT/models/shapes-sprint" --controlnet-init "$ROOT/models/shapes-sprint-controlnet" \
  --out "$ROOT/run" --export "$ROOT/run/export" ${STOP:+--stop-at "$STOP"} --no-progress > "$ROOT/run.log" 2>&1
stamp "distilled: $ROOT/run/export/controlnet"
rm -rf "$ROOT/controlnet"
cp -r "$ROOT/run/export/controlnet" "$ROOT/controlnet"
OMP_NUM_THREADS=2 "$PY" scripts/choose_conditioning_scale.py --model "$ROOT/models/shapes-sprint" \
  --controlnet "$ROOT/controlnet" --steps-list 1,2,3,4 ${STOP:+--num 20} --out "$ROOT/cscale.json" --write
stamp "scales chosen and written to $ROOT/controlnet/controlnet_config.json"
