# The README's commands: `make example` (set up, fetch the example data, transform it)
# and `make test` (set up, lint, run the tests). Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
DATA_DIR := data
# retrieve_example_data.py writes the path of the file it wrote here, so the transform
# step uses whichever dataset was retrieved (online: Dominguez Conde; offline: pbmc68k).
EXAMPLE_PATH_FILE := $(DATA_DIR)/.example_path

.PHONY: setup example test lint bench clean

setup: $(STAMP)

# torch first, pinned: an open torch requirement with no torch installed pulls a CUDA build.
# Then the project itself, editable, so that `import utils` works from any folder.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements-dev.txt
	$(PIP) install --no-deps -e .
	touch $(STAMP)

example: $(STAMP)
	$(PY) retrieve_example_data.py --output_dir $(DATA_DIR)
	$(PY) transform.py --data_filepath "$$(cat $(EXAMPLE_PATH_FILE))" --output_dir $(DATA_DIR) --overwrite

lint: $(STAMP)
	$(PY) -m ruff check .

test: $(STAMP) lint
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/transform_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
