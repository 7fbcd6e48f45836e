# Two commands matter: `make demo` and `make test`. Everything else is for developers.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the local CPU build; nothing later may pull a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/cellsift demo

# Both cores, in two parts: the tests not timed by the clock in TEST_WORKERS processes (the
# DDP tests, marked multi_device, 2 processes each, first: the others fill in around them);
# then those timed by the clock (marked serial), one at a time, alone. Both parts run; one
# failing fails the target, as does selecting no test at all (PYTEST_ARGS, e.g. a folder,
# may leave a part none; a -m there replaces each part's own). `pytest` alone runs all in one.
TEST_WORKERS ?= 2
PYTEST_PARTS := "not serial" "serial"

test: install
	@status=0; none=0; \
	for part in $(PYTEST_PARTS); do \
	  case "$$part" in serial) workers="";; *) workers="-n $(TEST_WORKERS) --dist worksteal";; esac; \
	  $(BIN)/python -m pytest -q $$workers -m "$$part" $(PYTEST_ARGS) \
	    || { rc=$$?; if [ $$rc -eq 5 ]; then none=$$((none + 1)); else status=$$rc; fi; }; \
	done; \
	if [ $$status -eq 0 ] && [ $$none -eq 2 ]; then status=5; fi; \
	exit $$status

bench: install
	$(BIN)/python -m pip install -q -e ".[dev,bench]"
	@set -e; for f in benchmarks/*.py; do \
	  case $$f in benchmarks/_*) continue;; esac; \
	  echo "== $$f"; $(BIN)/python $$f --quick; done

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache build dist
