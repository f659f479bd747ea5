"""Fixtures for the server tests: the tiny model loaded once, real servers on free ports."""
import pytest
from serve_utils import Running

from stllava.serve.model_backend import build_backend
from stllava.serve.protocol import create_app
from stllava.serve.server import UvicornServer


@pytest.fixture(scope="session")
def tiny_loaded(tiny_bundle):
    """(tokenizer, model, image_processor, context_len) of the tiny bundle, on CPU."""
    from stllava.model.builder import load_pretrained_model

    return load_pretrained_model(tiny_bundle["model"], device="cpu")


@pytest.fixture
def start_server(tiny_loaded):
    """Start servers of the tiny model (keyword arguments go to build_backend / create_app);
    all are stopped after the test."""
    started = []

    def start(api_key=None, max_body_bytes=32 * 2 ** 20, name="tiny", conv_mode="v1", allowed_hosts=None, **kw):
        tok, model, proc, ctx = tiny_loaded
        backend = build_backend(tok, model, proc, ctx, name=name, conv_mode=conv_mode, **kw)
        server = UvicornServer(create_app(backend, api_key=api_key, max_body_bytes=max_body_bytes, page=True,
                                          allowed_hosts=allowed_hosts))
        started.append(server.start())
        return Running(backend, server)

    yield start
    for s in started:
        s.stop()
