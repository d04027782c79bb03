# `make test` and `make quickstart` work on a fresh machine: they create .venv and install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: install install-dev test lint quickstart visuals bench clean-quickstart

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $(STAMP)

# The test suite, the linter and the export extras (onnx, onnxruntime) on top of the runtime.
$(DEV_STAMP): $(STAMP) requirements-dev.txt
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $(DEV_STAMP)

install: $(STAMP)

install-dev: $(DEV_STAMP)

test: install-dev
	$(BIN)/python -m pytest -q

lint: install-dev
	$(BIN)/ruff check .

# Synthetic pedestrians, a small teacher and its evaluation, then a small DG-Net, its appearance encoder's
# evaluation (beside the teacher's: DG-Net's claim is that joint training beats it) and its swaps (CPU:
# under 10 minutes on 2 cores; a GPU is used when there is one). Re-running reuses the runs in outputs/.
QUICK := $(BIN)/python
resume_if = $(if $(wildcard outputs/$(1)/checkpoints/*.pt),--resume,)
quickstart: install
	$(QUICK) -m data --config configs/quickstart/dgnet.yaml
	$(QUICK) train.py --config configs/quickstart/teacher.yaml --trainer baseline --name quickstart-teacher \
		$(call resume_if,quickstart-teacher)
	$(QUICK) test.py --name quickstart-teacher
	$(QUICK) train.py --config configs/quickstart/dgnet.yaml --name quickstart $(call resume_if,quickstart)
	$(QUICK) test.py --name quickstart
	$(QUICK) visualize.py metrics --name quickstart
	@echo
	@echo "swapped-identity images: outputs/quickstart/images/ (index.html shows the newest grids)"

# The README's figures (docs/) and generation metrics, from the quickstart's DG-Net (run `make quickstart` first).
visuals: install
	$(QUICK) visualize.py swap --name quickstart --count 8 --zoom 2 --quality 80 --out docs/quickstart_swap.jpg --overwrite
	$(QUICK) visualize.py rainbow --name quickstart --count 6 --zoom 2 --quality 80 --out docs/quickstart_rainbow.jpg --overwrite
	$(QUICK) visualize.py metrics --name quickstart

clean-quickstart:
	rm -rf outputs/quickstart outputs/quickstart-teacher datasets/synthetic

bench: install
	$(BIN)/python bench/synthetic_bench.py
