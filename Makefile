# Two commands on a fresh machine:  `make serve`  and  `make test`.
# Both create ./.venv and install guardproxy into it first (once; again when pyproject.toml changes).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config.example.yaml
# CPU build by default (a local wheel on the project's machines); on a CUDA host use e.g. TORCH_SPEC="torch==2.13.0"
# from the CUDA index. Never leave torch unpinned: an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# test files are spread over this many worker processes (pytest-xdist; whole files per worker, so module-scoped
# engines are built once); 0 runs everything in this process
PYTEST_WORKERS ?= 2
# e.g. make serve SERVE_ARGS="--guard-model /tmp/guard-planted --port 8081"
SERVE_ARGS ?=

.PHONY: install serve test bench clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/guardproxy serve --config $(CONFIG) $(SERVE_ARGS)

test: install
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/engine.py --shape tiny

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
