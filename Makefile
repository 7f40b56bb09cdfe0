# Two commands set everything up on a fresh machine:
#   make demo   install, then run the demo
#   make test   install, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed
# mil-serve's page: OpenSeadragon from the npm registry (web/package-lock.json pins it), copied into the
# package so that the page needs no CDN and a built wheel carries it
PAGE_VENDOR := mil_runtime/serve/page/vendor
PAGE_STAMP := $(PAGE_VENDOR)/.installed

.PHONY: install page demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	# large_image's annotation schema, read by tests/clinical/test_dsa.py (its own dependencies are girder's: not installed)
	$(PIP) install -q --no-deps -c constraints.txt girder-large-image-annotation
	touch $(STAMP)

$(PAGE_STAMP): web/package.json web/package-lock.json
	npm ci --prefix web --no-audit --no-fund --loglevel=error
	rm -rf $(PAGE_VENDOR) && mkdir -p $(PAGE_VENDOR)
	cp -r web/node_modules/openseadragon/build/openseadragon $(PAGE_VENDOR)/openseadragon
	cp web/node_modules/openseadragon/LICENSE.txt $(PAGE_VENDOR)/openseadragon/
	touch $(PAGE_STAMP)

install: $(STAMP) $(PAGE_STAMP)

page: $(PAGE_STAMP)

test: $(STAMP) $(PAGE_STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP) $(PAGE_STAMP)
	$(BIN)/python -m mil_runtime.demo

clean:
	rm -rf $(VENV) demo-out web/node_modules $(PAGE_VENDOR)
