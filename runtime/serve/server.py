"""Run the app with uvicorn: until SIGTERM or Ctrl-C (the command), or in a thread."""
from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time

from vispec.runtime.pipeline import Pipeline

from .app import Settings, create_app


def serve(pipelines: list[Pipeline], settings: Settings, host: str = "127.0.0.1",
          port: int = 8000, shutdown_timeout: float = 30.0) -> None:
    """Serve until SIGTERM/SIGINT: stop accepting, let requests in flight finish for up to
    ``shutdown_timeout`` seconds (then cancel them at their next pass), close the workers
    and return (a SIGTERM then ends the process with status 0)."""
    import uvicorn

    config = uvicorn.Config(create_app(pipelines, settings), host=host, port=port,
                            timeout_graceful_shutdown=shutdown_timeout, log_level="warning",
                            access_log=False)
    server = uvicorn.Server(config)
    main = threading.current_thread() is threading.main_thread()
    # uvicorn raises a caught SIGTERM again after its graceful stop; this handler takes it.
    previous = signal.signal(signal.SIGTERM, lambda *_: None) if main else None
    try:
        server.run()
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


class ServerThread:
    """The app served by uvicorn in a background thread on a loopback port (tests and
    benchmarks): ``url``, ``app``, ``pipelines``; ``stop()`` shuts it down gracefully."""

    def __init__(self, pipelines: list[Pipeline], settings: Settings, port: int = 0):
        import uvicorn

        self.pipelines, self.app = pipelines, create_app(pipelines, settings)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)

    def call(self, coroutine_function, *args):
        """Run ``coroutine_function(*args)`` on the server's event loop; its result."""
        return asyncio.run_coroutine_threadsafe(coroutine_function(*args),
                                                self.app.state.loop).result(30)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
