# The two commands the README opens with: `make demo` and `make test`.
# Both create .venv with every dependency pinned (setup.cfg + requirements-lock.txt).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo_out

.PHONY: venv demo test clean-demo

$(BIN)/.installed: setup.cfg requirements-lock.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -c requirements-lock.txt -e '.[test,aot]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	DEMO_DIR=$(DEMO_DIR) PYTHON=$(BIN)/python bash launch/demo.sh

# --capture=sys: native stderr (XLA, TF) goes straight to the log, so a native abort
# (LOG(FATAL)) leaves its reason behind instead of dying inside pytest's captured fd.
test: venv
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -q --capture=sys --durations=15 tests

clean-demo:
	rm -rf $(DEMO_DIR)
