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

.PHONY: install serve test lint generate browser
install: $(VENV)/.installed

# Debian's chromium and its driver, for the playground's browser test (tests/test_playground.py)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1) || \
		echo "warning: could not install chromium (apt, as root); the playground browser test will be skipped"

serve: $(VENV)/.installed
	$(VENV)/bin/triserve serve $(SERVE_ARGS)

test: $(VENV)/.installed browser
	$(PY) -m pytest -q -n 2 --durations=15

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

generate: $(VENV)/.installed
	$(VENV)/bin/triserve generate --model ../shared/fixtures/tiny-trimode-code --mode linear_spec \
		--prompt "def main():" --max-new-tokens 64
