"""Serve a checkpoint over the OpenAI chat-completions protocol (docs/Serving.md), with a chat page at ``/``.

    python -m stllava.serve.api --model-path CKPT [--model-base BASE] [--conv-mode v1] \\
        [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-batch 8] [--device cpu|cuda|mps]

Routes: ``POST /v1/chat/completions`` (text and ``image_url`` data-URL parts, ``stream``,
``temperature`` 0 = greedy, ``top_p``, ``max_tokens``, ``seed``, ``stop``), ``GET /v1/models``,
``GET /health``, ``GET /`` (the chat page). Concurrent requests are batched into one ``generate``
call (``--max-batch``, ``--batch-window-ms``); a full queue (``--max-queue``) answers 503 with
Retry-After. Every bad request gets OpenAI-style error JSON (400/401/404/408/413/415/421). Binds
127.0.0.1 unless ``--host`` says otherwise; answers only requests whose ``Host`` is in
``--allowed-hosts`` (default on loopback: localhost, 127.0.0.1, [::1]) and POSTs typed
``application/json`` (cross-site requests from web pages); a bind beyond loopback needs
``--allowed-hosts`` or ``--api-key``. A request must arrive whole within ``--request-timeout``
seconds; at most ``--max-connections`` connections are served at once (503 beyond).
Ctrl-C / SIGTERM: stop accepting, finish in-flight requests, exit.

The template defaults to the checkpoint config's ``conv_mode`` (recorded by training), else ``v1``.
The key may come from ``$STLLAVA_API_KEY`` instead of ``--api-key`` (other users can read a
process's arguments). Details: docs/Serving.md.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys

from stllava import logs
from stllava.conversation import conv_templates
from stllava.errors import StllavaError, run_cli

logger = logging.getLogger("stllava.serve.api")
API_KEY_ENV = "STLLAVA_API_KEY"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # any port


class ServeError(StllavaError):
    """A flag or checkpoint the server cannot start with."""


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine (localhost, 127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_policy(host: str, allowed_hosts: str | None, api_key: str | None) -> list[str] | None:
    """The ``Host`` values the server answers (:func:`stllava.serve.protocol.host_allowed`), None
    for any: ``--allowed-hosts`` (comma-separated) when given; else, bound to loopback, the
    loopback names and the bound address; else, with an API key, any (the key guards the server).
    Refuses (ServeError) a bind beyond loopback with neither: any web page its users open could
    use the model (DNS rebinding), and so could anyone who reaches the port."""
    if allowed_hosts:
        return [h.strip() for h in allowed_hosts.split(",") if h.strip()]
    if is_loopback(host):
        from stllava.serve.protocol import host_allowed

        return [*LOOPBACK_HOSTS] + ([] if host_allowed(host, LOOPBACK_HOSTS) else [host])
    if api_key:
        return None
    raise ServeError(f"--host {host} serves beyond this machine without --allowed-hosts or --api-key: anyone who "
                     "reaches the port, and any web page a user of this network opens, could use the model",
                     fix="pass --allowed-hosts with the names clients use (e.g. myserver.lan,10.0.0.5) and/or "
                     f"--api-key (or ${API_KEY_ENV})")


def default_conv_mode(config, model_path: str) -> tuple[str, str]:
    """``(template, where it came from)``: the config's ``conv_mode`` when present, else ``v1``.
    Refuses (ServeError) a ``conv_mode`` that names no template."""
    mode = getattr(config, "conv_mode", None)
    if mode is None:
        return "v1", "default; the checkpoint config records no conv_mode"
    if mode not in conv_templates:
        raise ServeError(f"conv_mode {mode!r} is not a known template ({sorted(conv_templates)})",
                         file=os.path.join(model_path, "config.json"), fix="pass --conv-mode")
    return mode, "from the checkpoint config"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True, help="checkpoint folder (any layout, see docs/Checkpoints.md)")
    p.add_argument("--model-base", default=None, help="base folder for LoRA / projector-only checkpoints")
    p.add_argument("--conv-mode", default=None, choices=sorted(conv_templates),
                   help="conversation template (default: the checkpoint config's conv_mode, else v1)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: folder name)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 exposes the server)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (or set ${API_KEY_ENV})")
    p.add_argument("--device", default="cuda", help="cuda (falls back to cpu when absent), cuda:N, mps, cpu")
    p.add_argument("--max-batch", type=int, default=8, help="most requests in one generate call")
    p.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="how long the first queued request waits for batch-mates (up to 100 ms more while "
                   "requests that already arrived are still decoding their images)")
    p.add_argument("--max-queue", type=int, default=64, help="queued requests beyond this get 503 + Retry-After")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="larger request bodies get 413")
    p.add_argument("--max-image-mb", type=float, default=20.0, help="larger images (encoded) get 400")
    p.add_argument("--max-image-pixels", type=int, default=40_000_000, help="larger images (decoded) get 400")
    p.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs (off: 400)")
    p.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host header values to answer, e.g. myserver.lan,10.0.0.5:8000 (no port: "
                   "any port; '*': any host); others get 421. Default on a loopback --host: localhost, 127.0.0.1, "
                   "[::1]; required beyond loopback unless --api-key is set")
    p.add_argument("--request-timeout", type=float, default=30.0,
                   help="seconds a client has to send a whole request (headers and body); slower ones get 408 "
                   "and are disconnected")
    p.add_argument("--max-connections", type=int, default=128,
                   help="connections served at once; requests on more get 503")
    logs.add_log_level_arg(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level)
    for flag in ("max_batch", "max_queue", "port", "max_connections"):
        if getattr(args, flag) < (0 if flag == "port" else 1):
            raise ServeError(f"--{flag.replace('_', '-')} must be ≥ {0 if flag == 'port' else 1}")
    if not args.request_timeout > 0:
        raise ServeError("--request-timeout must be > 0 seconds")
    try:
        from stllava.serve.inputs import ImageLimits
        from stllava.serve.model_backend import build_backend
        from stllava.serve.protocol import create_app
        from stllava.serve.server import UvicornServer
    except ImportError as e:
        raise ServeError(f"serving needs FastAPI and uvicorn ({e})", fix="pip install 'stllava[serve]'") from None
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    allowed_hosts = host_policy(args.host, args.allowed_hosts, api_key)  # refused before the model loads
    from stllava.mm_utils import get_model_name_from_path
    from stllava.model.builder import load_pretrained_model

    try:
        tokenizer, model, processor, context_len = load_pretrained_model(args.model_path, args.model_base,
                                                                         device=args.device)
    except (ValueError, OSError) as e:
        raise ServeError(str(e), fix="check --model-path / --model-base / --device") from None
    if args.conv_mode:
        conv_mode, source = args.conv_mode, "from --conv-mode"
    else:
        conv_mode, source = default_conv_mode(model.config, args.model_path)
    logger.info("conversation template %s (%s)", conv_mode, source)
    name = args.served_model_name or get_model_name_from_path(os.path.abspath(args.model_path))
    limits = ImageLimits(max_bytes=int(args.max_image_mb * 2 ** 20), max_pixels=args.max_image_pixels,
                         allow_remote=args.allow_remote_images)
    backend = build_backend(tokenizer, model, processor, context_len, name=name, conv_mode=conv_mode,
                            max_batch=args.max_batch, window_s=args.batch_window_ms / 1000,
                            max_queue=args.max_queue, limits=limits)
    app = create_app(backend, api_key=api_key, max_body_bytes=int(args.max_body_mb * 2 ** 20), page=True,
                     title=f"stllava: {name}", allowed_hosts=allowed_hosts)
    try:
        server = UvicornServer(app, args.host, args.port, access_log=True, request_timeout=args.request_timeout,
                               max_connections=args.max_connections)
    except OSError as e:
        raise ServeError(f"cannot listen on {args.host}:{args.port} ({e.strerror})",
                         fix="choose another --port") from None
    if not is_loopback(args.host) and api_key is None:
        logger.warning("listening on %s without an API key: anyone who can reach this port as %s can use the model",
                       args.host, ", ".join(allowed_hosts or ["any host"]))
    logger.info("serving %s on %s (page: %s/, API: %s/v1; %s, max batch %d)", name, server.url, server.url,
                server.url, model.device, args.max_batch)
    # uvicorn re-raises the signal that stopped it once in-flight requests are done; for SIGTERM that
    # is a normal, finished shutdown (exit 0). Ctrl-C stays an interruption (exit 130).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
