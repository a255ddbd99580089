# Two commands do all set-up on a fresh machine (Python 3.10+ with venv):
#   make demo   - install into .venv, then evaluate the shipped default policy in its environment
#   make test   - install into .venv, then run the test suite
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEFAULT_POLICY ?= policies/halfcheetah_2x3

.PHONY: install demo test serve bench peers-venv clean

install: $(STAMP)

# torch is pinned to the local CPU wheel first so the project's range (torch>=2.2,<3) installs nothing more.
# The kserve client (tests only) goes into a folder of its own, without its pins: tests/kserve-client.txt
$(STAMP): pyproject.toml tests/kserve-client.txt
	@echo "[1/4] creating $(VENV)"
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@echo "[2/4] torch 2.13.0 (CPU build)"
	$(BIN)/pip install -q "torch==2.13.0"
	@echo "[3/4] lorasa-serve with every extra (MuJoCo, JAX, ONNX, BentoML, test tools): 1-3 minutes"
	$(BIN)/pip install -q -e ".[all]"
	@echo "[4/4] the kserve test client (its own folder)"
	rm -rf $(VENV)/kserve-client
	$(BIN)/pip install -q --no-deps --target $(VENV)/kserve-client -r tests/kserve-client.txt
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lorasa-eval $(DEFAULT_POLICY) --episodes 5 --compare-random

test: $(STAMP)
	$(BIN)/python -m pytest -q

serve: $(STAMP)
	$(BIN)/bentoml serve

bench: $(STAMP)
	$(BIN)/lorasa-bench --quick

# MLServer, the peer of benchmarks/peers.py, in a venv of its own (its pins would downgrade starlette and
# OpenTelemetry under BentoML): python -m benchmarks.peers
peers-venv: $(VENV)/peers/.installed
$(VENV)/peers/.installed: $(STAMP)
	$(PY) -m venv $(VENV)/peers
	$(VENV)/peers/bin/pip install -q --upgrade pip
	$(VENV)/peers/bin/pip install -q "torch==2.13.0"
	$(VENV)/peers/bin/pip install -q "mlserver==1.7.1" -e .
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache
