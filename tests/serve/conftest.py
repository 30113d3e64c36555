"""Serve fixtures: the app on tiny models, served by uvicorn in this process on a free
loopback port; clients connect to 127.0.0.1 only."""
import socket

import pytest

for module in ("fastapi", "uvicorn", "httpx", "openai"):
    pytest.importorskip(module, reason=f"{module} is not installed: pip install "
                                       f"'vispec-export[serve]'")

LOOPBACK = ("127.0.0.1", "::1", "localhost")
TREE_ARGS = (8, 2, 3)  # a fixed tree: no `auto` measurement in the tests


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Loopback only: any other connection attempt fails the test."""
    connect = socket.socket.connect

    def loopback_only(self, address, *args):
        host = address[0] if isinstance(address, tuple) else address
        if host not in LOOPBACK:
            raise AssertionError(f"network access attempted: {address}")
        return connect(self, address, *args)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)


@pytest.fixture
def free_port():
    """``free_port()`` -> a loopback port nobody listens on now."""
    from vispec.runtime.serve.server import free_port
    return free_port


@pytest.fixture(scope="session")
def pipelines(tiny_target, tiny_drafter):
    """``pipelines(family, kind, n)`` -> n fresh Pipelines (kind None: no drafter)."""
    from vispec.runtime.pipeline import Pipeline
    from vispec.runtime.tree import TreeConfig

    def make(family="llava", kind="vispec", n=1):
        drafter = tiny_drafter(kind, family)[1] if kind else None
        return [Pipeline(tiny_target(family)[1], drafter_dir=drafter,
                         tree=TreeConfig(*TREE_ARGS)) for _ in range(n)]

    return make


@pytest.fixture
def serve(pipelines):
    """``serve(family="llava", kind="vispec", workers=1, **settings)`` -> a ``ServerThread``,
    stopped after the test."""
    from vispec.runtime.serve.app import Settings
    from vispec.runtime.serve.server import ServerThread
    started = []

    def start(family="llava", kind="vispec", workers=1, model_name="tiny", **settings):
        running = ServerThread(pipelines(family, kind, workers),
                               Settings(model=model_name, **settings))
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()

