# Two entry points, each sets up what it needs (a local .venv with the CPU build of torch 2.13.0 here;
# set TORCH=torch to take whatever build your platform's index serves).
VENV  ?= .venv
TORCH ?= torch==2.13.0
PY    := $(VENV)/bin/python

.PHONY: demo test setup
demo: $(VENV)/.installed
	$(VENV)/bin/flexdit demo

test: $(VENV)/.installed
	$(PY) -m pytest

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check "$(TORCH)"
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@
