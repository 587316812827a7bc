# Set-up and the two documented jobs. Everything installs into .venv; CPU torch is pinned so
# that no multi-GB CUDA build is downloaded on machines without a GPU.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

.PHONY: install serve test lint generate
install: $(VENV)/.installed

serve: $(VENV)/.installed
	$(VENV)/bin/triserve serve

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadgroup

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

generate: $(VENV)/.installed
	$(VENV)/bin/triserve generate --model ../shared/fixtures/tiny-trimode-code --mode linear_spec \
		--prompt "def main():" --max-new-tokens 64
