# Two set-up commands: `make demo` and `make test`. Both create the virtual environment on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint venv clean reproduce teacher student browser-deps

venv: $(STAMP)

# CPU torch first (a local wheel; an unpinned torch would pull a multi-GB CUDA build), then the package.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sana-sprint generate "a red circle to the left of a blue square" --steps 1 --num 4 --out demo.png
	@echo "wrote demo.png"

# Every experiment of the paper's Tables 1-6 + Fig. 3 at the stated CPU budget (~6 h on one core; resumable:
# rerun to continue). Writes docs/results.md + PNGs. E.g. REPRODUCE_ARGS="--jobs 2" or "--budget smoke".
REPRODUCE_ARGS ?=
reproduce: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python scripts/reproduce.py --budget full $(REPRODUCE_ARGS)

# The shipped shapes teacher (v5) from scratch, stage by stage (~415 CPU-minutes on 2 cores; every stage
# resumes from its checkpoints if interrupted; --stop-at replays the steps where our runs were stopped
# by their time limits). runs/teacher_pe/export is v3; the last three stages (twin_position scenes, half
# the training times at high noise) give v4 = runs/teacher_twin_mix2/export and
# v5 = runs/teacher_twin_mix3/export; a last stage at batch 1024 (a GPU's work) gives
# v6 = runs/teacher_v6/export (= models/shapes-teacher).
teacher: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/sana-sprint train-teacher --config configs/shapes-teacher.json --resume --stop-at 4219 --max-minutes 0
	OMP_NUM_THREADS=1 $(BIN)/sana-sprint train-teacher --config configs/shapes-teacher-stage2.json --stop-at 15243 --max-minutes 0
	OMP_NUM_THREADS=1 $(BIN)/sana-sprint train-teacher --config configs/shapes-teacher-stage3.json --stop-at 30673 --max-minutes 0
	rm -rf runs/teacher_30673_export && cp -r runs/teacher/export runs/teacher_30673_export
	OMP_NUM_THREADS=2 $(BIN)/sana-sprint train-teacher --config configs/shapes-teacher-pe.json
	OMP_NUM_THREADS=1 $(BIN)/sana-sprint train-teacher --config configs/shapes-teacher-twin-mix.json
	OMP_NUM_THREADS=1 $(BIN)/sana-sprint train-teacher --config configs/shapes-teacher-twin-mix2.json
	OMP_NUM_THREADS=1 $(BIN)/sana-sprint train-teacher --config configs/shapes-teacher-twin-mix3.json
	# v6: stage 8 at batch 1024 on the int8 pack of 16,000 rows of the twin-mix cache (ran on an H200 in 10.6 min;
	# ~11 h on one core of this CPU, estimated from 3 steps)
	$(BIN)/python scripts/pack_cache.py pack runs/cache/shapes-position2-twin3-mix-20000-r64 runs/twinmix16k.npz --rows 16000
	$(BIN)/python scripts/pack_cache.py unpack runs/twinmix16k.npz runs/cache/twinmix-16000-r64-int8
	$(BIN)/sana-sprint train-teacher --config configs/shapes-teacher-v6.json

# Student v9, the first stage of the shipped v18 (scripts/gpu/student_v10.sh continues v9 on a GPU into v10,
# scripts/student_v11.sh averages four CPU continuations of v10 into v11, scripts/student_v12.sh two of v11 into
# v12, scripts/student_v13.sh two rounds of two on a task-weighted mix into v13, scripts/student_v14.sh two
# rounds with self-refinement into v14, scripts/student_v15.sh two rounds on teacher-repaired pairs into v15,
# scripts/student_v16.sh five such runs on a GPU, averaged, into v16, scripts/student_v17.sh eight more from v16
# into v17, scripts/student_v18.sh five from v17 on this CPU into v18):
# student v8
# (distilled from teacher v5; restored from git history) plus the teacher's fine-tune v6 - v5 (weight
# arithmetic), then 2,000 steps towards teacher v6 on this CPU (~100 min on one core
# + ~13 min of teacher pairs + the latent cache on first use). Writes runs/distill_v9/export with its timesteps chosen.
student: $(STAMP)
	mkdir -p runs/teacher_v5 runs/student_v8
	git archive 9d9864c models/shapes-teacher | tar -x -C runs/teacher_v5
	git archive 7043cc6 models/shapes-sprint | tar -x -C runs/student_v8
	$(BIN)/python scripts/task_vector.py --student runs/student_v8/models/shapes-sprint \
	  --old runs/teacher_v5/models/shapes-teacher --new models/shapes-teacher --alpha 1.0 --out runs/tv/v8_plus_v6_minus_v5
	OMP_NUM_THREADS=1 $(BIN)/sana-sprint distill --config configs/shapes-distill-v9-cpu.json --prepare-only
	OMP_NUM_THREADS=1 $(BIN)/python scripts/teacher_pairs.py --teacher models/shapes-teacher \
	  --cache runs/cache/shapes-12000-r64 --n 4096 --shard 512 --out runs/pairs/v6_20_4k
	OMP_NUM_THREADS=1 $(BIN)/sana-sprint distill --config configs/shapes-distill-v9-cpu.json
	$(BIN)/python scripts/choose_timesteps.py --model runs/distill_v9/export --steps-list 2,4 --limit 90 \
	  --images-per-prompt 2 --out runs/timesteps/sprint_v9.json --write

# The browser end-to-end test needs Debian's chromium + chromedriver; without them it is skipped.
browser-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 || \
	    echo "warning: could not install chromium; the browser test will be skipped"; }

test: $(STAMP) browser-deps
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ""

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
