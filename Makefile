# make demo: install everything (Debian packages, .venv, torch, Horovod) and train the demo.
# make test: install everything and run the whole test suite.
VENV ?= .venv
STAMP := $(VENV)/.setup-done

.PHONY: setup demo demo-tsn test clean

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

clean:
	rm -rf runs data/demo data/demo_multilabel .pytest_cache
