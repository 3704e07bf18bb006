# Two commands on a fresh clone (each sets itself up into .venv first):
#   make demo   - the main job on its embedded defaults
#   make test   - the whole test suite, except the 3-node cluster test (make test-multinode)
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.raydpo-setup

.PHONY: setup demo test test-fast test-multinode clean

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

setup: $(STAMP)

demo: $(STAMP)
	$(PY) jobs/online_dpo.py $(ARGS)

# Two pytest workers, each with its own local Ray: the suite spends much of its time
# starting processes and waiting on them, and two streams keep both cores busy
# (measured: 2046 s serial, 1167-1208 s with -n 2, 92% of both cores busy). A module stays on
# one worker (loadscope), so module fixtures (a trained model, a Serve port) are built once.
# Modules are handed out in the order tests/conftest.py (MODULE_ORDER) gives, not by test
# count: that order started the longest module (e2e) near the end, leaving one worker idle.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder --durations=15 -m "not multinode" $(ARGS)

# The 3-node cluster test (tests/test_multinode.py): ~4 minutes beside the rest; with it the
# suite took 17.2 of its 20 minutes in a fresh clone on a fast day, so it runs on its own.
test-multinode: $(STAMP)
	$(PY) -m pytest -q -m multinode $(ARGS)

# The inner loop: every test not marked `slow` (no Ray, vLLM or Serve start-up, no training run).
# CI and `make test` run everything but `multinode`.
test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow" $(ARGS)

clean:
	rm -rf runs .pytest_cache
