"""A model server for tests outside tests/serve: ``stllava.serve.api``'s app on 127.0.0.1."""
from contextlib import contextmanager

from stllava.serve.model_backend import build_backend
from stllava.serve.protocol import create_app
from stllava.serve.server import UvicornServer


@contextmanager
def model_server(pretrained, conv_mode: str, name: str = "tiny", **kw):
    """Serve ``pretrained`` (load_pretrained_model's 4-tuple) as ``name`` with template ``conv_mode``
    (keyword arguments go to build_backend); yields ``(base_url, backend)``, stopped afterwards."""
    tok, model, proc, ctx = pretrained
    backend = build_backend(tok, model, proc, ctx, name=name, conv_mode=conv_mode, **kw)
    server = UvicornServer(create_app(backend)).start()
    try:
        yield server.url + "/v1", backend
    finally:
        server.stop()
