# Two commands on a fresh clone (each sets itself up into .venv first):
#   make demo   - the main job on its embedded defaults
#   make test   - the whole test suite
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.raydpo-setup

.PHONY: setup demo test clean

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

setup: $(STAMP)

demo: $(STAMP)
	$(PY) jobs/online_dpo.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 $(ARGS)

clean:
	rm -rf runs .pytest_cache
