# make demo: install everything (Debian packages, .venv, torch, Horovod) and train the demo.
# make test: install everything and run the whole test suite.
# make lint: ruff on tsmtrain/ and tests/ (its rules are in pyproject.toml).
VENV ?= .venv
STAMP := $(VENV)/.setup-done

.PHONY: setup demo demo-tsn test lint clean

setup: $(STAMP)

$(STAMP): scripts/setup.sh requirements.txt pyproject.toml
	bash scripts/setup.sh
	touch $(STAMP)

demo: setup
	$(VENV)/bin/tsmtrain run configs/demo.yaml

demo-tsn: setup
	$(VENV)/bin/tsmtrain run configs/demo.yaml --set model.shift=false --set run.name=demo-tsn

test: setup
	$(VENV)/bin/pytest

lint: setup
	$(VENV)/bin/ruff check tsmtrain tests

clean:
	rm -rf runs data/demo data/demo_multilabel .pytest_cache
