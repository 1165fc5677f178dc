VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: venv demo test lint bench clean

$(VENV)/.installed: pyproject.toml setup.py merging/methods/_fused.c
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $(VENV)/.installed

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/basin demo

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: venv
	$(PY) -m ruff check .

bench: venv
	$(PY) benchmarks/merge_throughput.py
	$(PY) benchmarks/landscape_speed.py
	$(PY) benchmarks/probe_speed.py

clean:
	rm -rf $(VENV) build *.egg-info
