# torch is pinned to the CPU wheel that CI machines carry; GPU users override it, e.g.
#   make test TORCH_SPEC="torch==2.9.1 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# Two test processes of one torch thread each (tests/conftest.py); a file's tests stay in one process, so its
# module-scoped fixtures are built once. `make test PYTEST_WORKERS=0` runs in one process.
PYTEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile)
PYTEST_ARGS ?=

.PHONY: install test test-faults docs demo bench lint format clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test,tensorboard,docs]"
	touch $@

install: $(VENV)/.installed

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(XDIST) -m "not faults" $(PYTEST_ARGS)
	$(MAKE) docs

# The fault suite (tests/test_faults.py): runs killed, preempted and saving onto a full disk, in subprocesses.
test-faults: install
	$(PY) -m pytest $(XDIST) -m faults $(PYTEST_ARGS)

# The documentation site in strict mode: a broken link, anchor or API reference fails the build.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

demo: install
	$(PY) examples/demo.py --output_dir demo_output

bench: install
	$(PY) -m benchmarks.run_all

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) site demo_output .pytest_cache .ruff_cache *.egg-info
