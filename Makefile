# `make demo` and `make test` each set everything up on a fresh machine: a .venv with the pinned
# CPU torch (override: make test TORCH=torch==2.11.0), then routerlab with all its extras.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/routerlab ablate configs/ablations/demo.yaml

# Two xdist workers (one per core); tests that share a module-scoped fixture carry one xdist_group mark.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

bench: $(STAMP)
	$(BIN)/routerlab bench

clean:
	rm -rf $(VENV) runs results
