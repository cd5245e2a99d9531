# Two commands: `make demo` and `make test`. Each sets up .venv on first use and is a fast no-op install after.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_STAMP := $(VENV)/.torch-2.13.0
STAMP := $(VENV)/.installed

.PHONY: install browser demo test clean-venv

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

# Trains ETRM (`demo` preset, traced) on generated few-shot tasks, then prints the doctor's report of the run.
demo: install
	@run=runs/demo-$$(date +%Y%m%d-%H%M%S); \
	$(VENV)/bin/etrm-train --preset demo --trace --run-dir $$run && \
	$(VENV)/bin/etrm-doctor $$run

# The dashboard's browser tests drive Debian's chromium through chromedriver: installed with apt only when missing
# (as root, or through sudo). Where it cannot be installed, those tests skip and say why.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  echo "installing chromium and chromium-driver for the dashboard's browser tests"; \
	  ( $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    chromium chromium-driver >/dev/null ) || \
	  echo "warning: could not install chromium; the browser tests will be skipped"; \
	fi

test: install browser
	$(PY) -m pytest

clean-venv:
	rm -rf $(VENV)
