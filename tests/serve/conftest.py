"""Serve fixtures: the app on tiny models, served by uvicorn in this process on a free
loopback port; clients connect to 127.0.0.1 only."""
import asyncio
import socket
import threading
import time

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port():
    """``free_port()`` -> a loopback port nobody listens on now."""
    return _free_port


class Running:
    """A uvicorn server in a thread; ``url``, ``app``, ``pipelines``; stops on ``stop()``."""

    def __init__(self, pipelines, settings, **config):
        import uvicorn

        from vispec.serve.app import create_app
        self.pipelines, self.settings = pipelines, settings
        self.app = create_app(pipelines, settings)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def call(self, fn, *args):
        """Run ``fn(*args)`` (a coroutine function) on the server's event loop."""
        loop = self.server_loop()
        return asyncio.run_coroutine_threadsafe(fn(*args), loop).result(10)

    def server_loop(self):
        return self.app.state.loop

    def stop(self):
        self.server.should_exit = True
        self.thread.join(20)
        assert not self.thread.is_alive()


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
    """``serve(family="llava", kind="vispec", workers=1, **settings)`` -> a Running server,
    stopped after the test."""
    from vispec.serve.app import Settings
    started = []

    def start(family="llava", kind="vispec", workers=1, model_name="tiny", **settings):
        running = Running(pipelines(family, kind, workers),
                          Settings(model=model_name, **settings))
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()

