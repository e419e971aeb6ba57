# The README's commands. `make demo` and `make test` each do their own set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# A GPU image picks its own build, e.g. `make install TORCH_SPEC="torch==2.13.0 --index-url ..."`.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
export DS_ACCELERATOR ?= cpu

.PHONY: install system demo test lint format bench clean up down

install: $(VENV)/.installed system

# Debian packages the tests drive: Chromium (the run report, checked in a real browser),
# Prometheus (`neoray up --metrics`, the dashboards' queries) and PostgreSQL (MLflow's database
# in `neoray up`), each with the program that shows it is there. Installed with apt-get where
# missing and this user may; otherwise say how.
SYSTEM_PACKAGES := chromium:chromium prometheus:prometheus postgresql:pg_ctlcluster
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends
system:
	@for entry in $(SYSTEM_PACKAGES); do \
	  pkg=$${entry%%:*}; command -v $${entry#*:} >/dev/null 2>&1 && continue; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    $(APT_INSTALL) $$pkg >/dev/null || { apt-get update -q >/dev/null && $(APT_INSTALL) $$pkg >/dev/null; }; \
	  else \
	    echo "$$pkg is not installed (tests that need it are skipped): sudo apt-get install $$pkg"; \
	  fi; \
	done

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: install
	$(BIN)/python jobs/demo.py

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/preprocess_throughput.py
	$(BIN)/python bench/tokenizer_compression.py
	$(BIN)/python bench/engine_overhead.py
	$(BIN)/python bench/async_snapshot.py
	$(BIN)/python bench/upload_throughput.py
	$(BIN)/python bench/eval_fanout.py
	$(BIN)/python bench/eval_scaling.py
	$(BIN)/python bench/eval_watch_latency.py
	$(BIN)/python bench/sweep_overhead.py
	$(BIN)/python bench/metrics_overhead.py

up: install
	$(BIN)/neoray up

down: install
	$(BIN)/neoray down

clean:
	rm -rf runs outputs mlruns.db .pytest_cache
