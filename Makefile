# The two commands of the README: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
EXTRAS ?= all
# Threads for the 2-core CPU machines; GPUs ignore it. Idle OpenMP threads sleep instead of spinning:
# up to 5x faster on a busy machine; the cost on an idle one is unmeasured (docs/benchmarks.md, Thread settings).
export OMP_NUM_THREADS ?= 2
export OMP_WAIT_POLICY ?= PASSIVE
export DS_BUILD_OPS := 0
export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo demo-real bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, from the local CPU wheel: resolving it together with the rest pulls a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

# One worker per core; a test file runs on one worker, so its module-scoped runs are made once.
test: $(STAMP)
	$(PY) -m pytest -n auto --dist loadfile

demo: $(STAMP)
	$(PY) -m flowvid.demo --out demo_out

demo-real: $(STAMP)
	$(PY) -m flowvid.demo --real --out demo_out

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) demo_out lightning_logs
