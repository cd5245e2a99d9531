# Two commands: `make demo` and `make test`. Each sets up .venv on first use and is a fast no-op install after.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_STAMP := $(VENV)/.torch-2.13.0
STAMP := $(VENV)/.installed

.PHONY: install browser demo reproduce reproduce-summary test clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

# The pinned CPU build lies on disk; an unpinned torch would pull a multi-GB CUDA build. Install it first.
$(TORCH_STAMP): | $(PY)
	$(PY) -m pip install -q torch==2.13.0
	touch $@

$(STAMP): pyproject.toml $(TORCH_STAMP)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

# Trains the `demo` preset traced in reencode, cached and fct modes and `demo-trm` (a few minutes on 2 CPU cores),
# prints each run's doctor verdict, then serves etrm-dash on those runs (Ctrl-C ends it). Runs: runs/demo-<time>/.
# DEMO_SERVE=0 skips the server, DEMO_STEPS=N sets the steps per run; see scripts/demo.py for the other settings.
demo: install
	$(PY) scripts/demo.py

# The gradient-starvation study of docs/reproduction.md: trains the four runs, writes docs/figures/repro-*.
reproduce: install
	$(PY) scripts/reproduce.py

# The summary's regime (halt_max_steps 16, exploration 0.5, batch 256): cached and reencode side by side, each
# stopped at 3000 steps or 60 minutes of its CPU time (its wall time on idle cores), whichever comes first
# (REPRO_MINUTES=N changes the cap); writes docs/figures/summary-coverage.png and summary-tables.md. REPRO_STEPS=N shortens it.
reproduce-summary: install
	$(PY) scripts/reproduce.py --regime summary $(if $(REPRO_STEPS),--steps $(REPRO_STEPS)) \
	  $(if $(REPRO_MINUTES),--minutes $(REPRO_MINUTES))

# The dashboard's browser tests drive Debian's chromium through chromedriver: installed with apt only when missing
# (as root, or through sudo). Where it cannot be installed, those tests skip and say why. `make test BROWSER=0`
# never calls apt (the browser tests then skip unless chromium is there already).
BROWSER ?= 1
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  echo "installing chromium and chromium-driver for the dashboard's browser tests"; \
	  ( $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    chromium chromium-driver >/dev/null ) || \
	  echo "warning: could not install chromium; the browser tests will be skipped"; \
	fi

test: install $(if $(filter 0,$(BROWSER)),,browser)
	$(PY) -m pytest --durations=15

clean-venv:
	rm -rf $(VENV)
