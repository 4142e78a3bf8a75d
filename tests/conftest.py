"""Session fixtures: tiny random checkpoints (tests/checkpoints.py), each built once per session."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable

import pytest
from typer.testing import CliRunner

from checkpoints import Tiny, build, relayout


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Tiny]:
    """tiny(family, layout="legacy", shards=1, **build_options) -> Tiny, built lazily and cached for the session.

    Other layouts and shardings are relayouts of the legacy one-shard build with the same options, so they hold
    the same weights and share its reference model (do not modify `Tiny.model` in a test).
    """
    root = tmp_path_factory.mktemp("tiny")
    cache: dict[tuple, Tiny] = {}

    def get(family: str, layout: str = "legacy", shards: int = 1, **options) -> Tiny:
        opts = tuple(sorted(options.items()))
        key = (family, layout, shards, opts)
        if key not in cache:
            name = "-".join([family, layout, str(shards)] + [f"{k}={v}".replace("torch.", "") for k, v in opts])
            if (layout, shards) == ("legacy", 1):
                cache[key] = build(family, root / name, **options)
            else:
                cache[key] = relayout(get(family, **options), root / name, layout, shards)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_llava(tiny) -> Tiny:
    return tiny("llava")


@pytest.fixture(scope="session")
def tiny_vipllava(tiny) -> Tiny:
    return tiny("vipllava")


@pytest.fixture(scope="session")
def tiny_qwen(tiny) -> Tiny:
    return tiny("qwen")


@pytest.fixture(scope="session")
def runner() -> CliRunner:
    """typer's CliRunner (stdout and stderr kept apart)."""
    return CliRunner()


@pytest.fixture(scope="session")
def qwen(tiny) -> str:
    """The folder of the tiny interleave-qwen checkpoint, as a command-line argument."""
    return str(tiny("qwen").folder)


@pytest.fixture(scope="module")
def serve() -> Callable[[type[http.server.BaseHTTPRequestHandler]], str]:
    """serve(handler class) -> the base URL of a threaded HTTP server on 127.0.0.1 (random port), until module end."""
    servers = []

    def start(handler: type[http.server.BaseHTTPRequestHandler]) -> str:
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()
