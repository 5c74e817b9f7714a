# The README's two commands: `make quickstart` and `make test`. Each sets up .venv by itself.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.reglab-installed
# pip on the project machines serves these two from a local copy; override elsewhere if needed.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# one pytest worker per core of the project machines; a test file stays on one worker (its module fixtures,
# such as the every-config test's shared pretraining cache, are built once)
TEST_WORKERS ?= 2

.PHONY: quickstart test install bench-effects

$(STAMP): pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/reglab fit --config configs/experiment/quickstart.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench-effects: $(STAMP)
	$(VENV)/bin/reglab bench effects --seeds 3
