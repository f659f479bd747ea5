# Two commands do everything: `make demo` and `make test`.
# Each creates .venv on first use: torch==2.13.0 first (the local CPU wheel; an unpinned torch
# would pull a multi-GB CUDA build), then the project with its dev extras at the versions in
# constraints.txt — the versions README's numbers were measured with (a newer transformers or
# accelerate changes the demo's numbers; regenerate constraints.txt and the numbers together).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export OMP_NUM_THREADS := 1
export PYTHONUNBUFFERED := 1

.PHONY: test test-fast lint demo install clean browser

$(STAMP): pyproject.toml constraints.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VPY) -m ruff check .
	$(VPY) -m pylint stllava

# Headless Chromium and its WebDriver from Debian's packages, for the chat-page test
# (tests/serve/test_page.py). When they cannot be installed (no root, no apt-get, offline) this says
# why, and the test skips with the same reason.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "make browser: installing chromium and chromium-driver (Debian packages) for the chat-page test"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || \
	  echo "make browser: apt-get could not install chromium and chromium-driver; the chat-page test will skip"; \
	else echo "make browser: chromium is not installed and installing it needs root and apt-get; the chat-page test will skip"; fi

# Everything: lint, then every test (slow multi-process and end-to-end ones included). CI runs this.
test: lint browser
	$(VPY) -m pytest -q --durations=25 tests

# The same without the tests marked `slow` (multi-process, end-to-end): for quick iterations.
test-fast: lint browser
	$(VPY) -m pytest -q -m "not slow" tests

demo: $(STAMP)
	$(VPY) -m stllava.demo

clean:
	rm -rf $(VENV) playground/demo
