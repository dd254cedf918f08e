# Two commands for a newcomer: `make demo` (set up + main job) and `make test` (set up + tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CLUSTER_STAMP := $(VENV)/.installed-cluster
RUNS ?= runs
export PYTHONHASHSEED := 0

.PHONY: install world demo reproduce test test-all bench clean

install: $(STAMP)

# torch/torchvision pinned to the wheels on this machine's disk (no multi-GB download);
# extras: cpu (onnxruntime), train, export, dev, openvino (OpenVINO + NNCF: their tests run in CI), serve (the HTTP
# service).
# `gpu` and `trt` are for CUDA machines.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[cpu,train,export,dev,openvino,serve]'
	touch $(STAMP)

# Ray (the `cluster` extra, ~330 MiB) only for test-all: its test is slow-marked, `make test` stays lean.
$(CLUSTER_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[cpu,train,export,dev,openvino,serve,cluster]'
	touch $(CLUSTER_STAMP)

world: install
	test -f $(RUNS)/world/manifest.jsonl || $(VENV)/bin/sglora-edge world --out $(RUNS)/world --preset default

# ~10 min on 2 cores, every stage cached under runs/demo: world -> tiny CLIP -> photo-domain experts -> library
# -> generator (one seed) -> in-dataset table -> export of the bundle -> `run` on an unseen class (torch blocked)
demo: world
	$(VENV)/bin/sglora-edge reproduce --data $(RUNS)/world --out $(RUNS)/demo --preset demo --jobs 2
	$(PY) -m sglora_edge.demo --run $(RUNS)/demo --data $(RUNS)/world

# the paper run behind the README's tables: both domains, every setting, 3 role rotations (every class unseen once),
# 3 test galleries per task, cross-validation per rotation, ablations (rotation 0), one generator seed
reproduce: world
	$(VENV)/bin/sglora-edge reproduce --data $(RUNS)/world --out $(RUNS)/paper --jobs 2

test: install
	$(PY) -m pytest tests -m "not slow"

test-all: $(CLUSTER_STAMP)
	$(PY) -m pytest tests

# the standard set on this machine: tiny and ViT-B/16 bundles with random weights, through the real export path,
# with INT8 copies and the table of engines and precisions (ONNX Runtime, OpenVINO fp32/bf16/INT8, PyTorch);
# BENCH_ARGS="--bundle DIR" adds a trained bundle (its recall per precision is measured on runs/world)
bench: install
	$(VENV)/bin/sglora-edge bench --synthetic sglora-tiny --synthetic ViT-B-16 --int8 --openvino \
		$(if $(wildcard $(RUNS)/world/manifest.jsonl),--oracle-world $(RUNS)/world --recall-world $(RUNS)/world) \
		--gallery-size 32 --stage-budget 30 --out $(RUNS)/bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(RUNS)
