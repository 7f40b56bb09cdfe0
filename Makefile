# Two commands set everything up on a fresh machine:
#   make demo   install, then run the demo
#   make test   install, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	# large_image's annotation schema, read by tests/clinical/test_dsa.py (its own dependencies are girder's: not installed)
	$(PIP) install -q --no-deps -c constraints.txt girder-large-image-annotation
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m mil_runtime.demo

clean:
	rm -rf $(VENV) demo-out
