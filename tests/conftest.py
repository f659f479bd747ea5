"""Shared test fixtures. Every test runs offline on CPU with tiny models built from config."""
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# DeepSpeed's JIT-built ops (and their build locks) stay inside this checkout: a lock another
# checkout's killed run left behind cannot stall this one (tests/ranks.py).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(pathlib.Path(__file__).resolve().parents[1] / ".cache"
                                                  / "torch_extensions"))

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LLAMA_TOKENIZER = SHARED / "data" / "llama-tokenizer" / "tokenizer.model"
VQA_RAD = SHARED / "data" / "vqa_rad"


@pytest.fixture(scope="session")
def shm_comm_op():
    """DeepSpeed's CPU comm op, built once per session before any test starts ranks."""
    from ranks import build_shm_comm_op

    build_shm_comm_op(dict(os.environ))


@pytest.fixture(scope="session")
def llama_tokenizer_path():
    """The real LLaMA tokenizer.model from ../shared, or skip when the checkout has no ../shared."""
    if not LLAMA_TOKENIZER.exists():
        pytest.skip("../shared/data/llama-tokenizer not present")
    return LLAMA_TOKENIZER


@pytest.fixture(scope="session")
def vqa_rad_dir():
    if not (VQA_RAD / "testset.json").exists():
        pytest.skip("../shared/data/vqa_rad not present")
    return VQA_RAD


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A complete tiny bundle (tower, LLM, tokenizer, LLaVA model) built once per session."""
    from stllava.model.tiny import build_tiny_bundle

    return build_tiny_bundle(str(tmp_path_factory.mktemp("tiny_bundle")), seed=0)


@pytest.fixture(scope="module")
def pretrained(tiny_bundle):
    """``load_pretrained_model``'s (tokenizer, model, image_processor, context_len) for the tiny
    bundle on the CPU, loaded once per test module (a test may change the model's state)."""
    from stllava.model.builder import load_pretrained_model

    return load_pretrained_model(tiny_bundle["model"], device="cpu")


@pytest.fixture(scope="module")
def loaded(pretrained):
    """(tokenizer, model, image_processor) of :func:`pretrained`: what the generating tools take."""
    tok, model, proc, _ = pretrained
    return tok, model, proc


@pytest.fixture(scope="module")
def tok_proc(tiny_bundle):
    """The tiny bundle's training tokenizer (``model_max_length`` 1024) and its CLIP image processor."""
    from transformers import CLIPImageProcessor

    from stllava.model.builder import load_tokenizer

    return load_tokenizer(tiny_bundle["model"], 1024, training=True), CLIPImageProcessor.from_pretrained(tiny_bundle["model"])


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """The locally trained LLaMA-like tokenizer (no ../shared needed)."""
    from stllava.model.tiny_tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer(str(tmp_path_factory.mktemp("tiny_tok")))
