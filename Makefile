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

.PHONY: test test-fast lint demo install clean browser lmms-eval

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

# lmms-eval (docs/Evaluation.md#lmms-eval) in an environment of its own, .venv-lmms: lmms-eval needs
# torchvision, and torchvision pins a torch release whose wheel here is a CUDA build (x86_64,
# Python 3.11: torch 2.14.1 + torchvision 0.29.1 from local wheels, ~5.5 GB; it runs on the CPU),
# which must not replace .venv's pinned CPU torch. `make test` never uses it. `make lmms-eval`
# builds it once, then scores the embedded VQA-RAD subset with a tiny random-init model through
# lmms-eval and through model_vqa + metrics, and fails unless both give identical numbers.
LMMS_VENV := .venv-lmms
LMMS_PY := $(LMMS_VENV)/bin/python
LMMS_STAMP := $(LMMS_VENV)/.installed
LMMS_OUT ?= playground/lmms-eval

$(LMMS_STAMP): pyproject.toml
	test -x $(LMMS_PY) || $(PY) -m venv $(LMMS_VENV)
	$(LMMS_PY) -m pip install -q --upgrade pip
	$(LMMS_PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	# sentencepiece<0.2.3: 0.2.3's model reader needs protobuf>=7, but lmms-eval pins wandb 0.25, which
	# needs protobuf<7; with 0.2.3 transformers cannot read a SentencePiece tokenizer.model here.
	# filelock<4: lmms-eval 0.7.3's evaluator imports filelock._api, which filelock 4 no longer has.
	$(LMMS_PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 lmms-eval==0.7.3 'sentencepiece<0.2.3' \
	    'filelock<4' -e .
	touch $(LMMS_STAMP)

lmms-eval: $(LMMS_STAMP)
	$(LMMS_PY) -m stllava.integrations.lmms_eval.check --out $(LMMS_OUT)

clean:
	rm -rf $(VENV) playground/demo
