# `make test` and `make quickstart` work on a fresh machine: they create .venv and install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: install install-dev test lint quickstart quickstart-run visuals bench clean-quickstart

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
# evaluation (beside the teacher's: DG-Net's claim is that joint training beats it) and its swaps. On the
# CPU: configs/quickstart/{teacher,dgnet}.yaml, 60 training identities and 160 DG-Net iterations, under 10
# minutes on 2 cores, into outputs/quickstart-teacher and outputs/quickstart. On a GPU:
# configs/quickstart/{teacher,dgnet}_gpu.yaml, 3,000 training identities and 4,800 iterations, into
# outputs/quickstart-gpu-teacher and outputs/quickstart-gpu. Re-running reuses the runs in outputs/.
QUICK := $(BIN)/python
resume_if = $(if $(wildcard outputs/$(1)/checkpoints/*.pt),--resume,)
# `gpu` when torch sees a CUDA GPU (asked when a recipe runs, after the install)
ON_GPU = $$($(QUICK) -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')")
quickstart: install
	@if [ "$(ON_GPU)" = gpu ]; then $(MAKE) --no-print-directory quickstart-run QS_SUFFIX=_gpu \
		QS_TEACHER=quickstart-gpu-teacher QS_NAME=quickstart-gpu; else $(MAKE) --no-print-directory quickstart-run; fi

QS_SUFFIX ?=
QS_TEACHER ?= quickstart-teacher
QS_NAME ?= quickstart
quickstart-run: install
	$(QUICK) -m data --config configs/quickstart/dgnet$(QS_SUFFIX).yaml
	$(QUICK) train.py --config configs/quickstart/teacher$(QS_SUFFIX).yaml --trainer baseline --name $(QS_TEACHER) \
		$(call resume_if,$(QS_TEACHER))
	$(QUICK) test.py --name $(QS_TEACHER)
	$(QUICK) train.py --config configs/quickstart/dgnet$(QS_SUFFIX).yaml --name $(QS_NAME) $(call resume_if,$(QS_NAME))
	$(QUICK) test.py --name $(QS_NAME)
	$(QUICK) results.py --runs $(QS_TEACHER) $(QS_NAME) --last
	$(QUICK) visualize.py metrics --name $(QS_NAME)
	@echo
	@echo "swapped-identity images: outputs/$(QS_NAME)/images/ (index.html shows the newest grids)"

# The README's figures (docs/) and generation metrics, from the quickstart's DG-Net (run `make quickstart`
# first; on a machine with a GPU, from its run quickstart-gpu).
visuals: install
	@name=$$([ "$(ON_GPU)" = gpu ] && echo quickstart-gpu || echo quickstart); \
	$(QUICK) visualize.py swap --name $$name --count 8 --zoom 2 --quality 80 --out docs/quickstart_swap.jpg --overwrite && \
	$(QUICK) visualize.py rainbow --name $$name --count 6 --zoom 2 --quality 80 --out docs/quickstart_rainbow.jpg --overwrite && \
	$(QUICK) visualize.py metrics --name $$name

clean-quickstart:
	rm -rf outputs/quickstart outputs/quickstart-gpu outputs/quickstart-teacher outputs/quickstart-gpu-teacher \
		datasets/synthetic datasets/synthetic-3k

bench: install
	$(BIN)/python bench/synthetic_bench.py
