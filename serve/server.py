"""Run the app with uvicorn until SIGTERM or Ctrl-C, then stop gracefully."""
from __future__ import annotations

import signal
import threading

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
