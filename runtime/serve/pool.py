"""Workers, each owning one ``Pipeline`` (its own KV caches, so its own conversation), and
the bounded queue in front of them.

A request waits for a free worker; of the free workers it takes the one whose cached rows
its prompt starts with the most of (its conversation's, when that worker is free). At most
``queue`` requests wait; one more is refused (``QueueFull``). Generation runs in the
worker's thread (ONNX Runtime releases the GIL); tokens come back to the event loop.
"""
from __future__ import annotations

import asyncio
import collections
import threading
from concurrent.futures import ThreadPoolExecutor

from vispec.runtime.families import Prompt
from vispec.runtime.generate import GenerationResult
from vispec.runtime.pipeline import Pipeline


class QueueFull(Exception):
    """Every worker is busy and the queue holds its maximum."""


class Worker:
    """One pipeline and the thread that runs its generations."""

    def __init__(self, index: int, pipe: Pipeline):
        self.index, self.pipe = index, pipe
        self.thread = ThreadPoolExecutor(1, thread_name_prefix=f"vispec-worker-{index}")

    def run(self, prompt: Prompt, max_new_tokens: int, draft: bool, on_tokens, *, sampling,
            cancel: threading.Event) -> asyncio.Future:
        """Generate in the worker's thread (an awaitable of the ``GenerationResult``)."""
        def call() -> GenerationResult:
            return self.pipe.reply(prompt, max_new_tokens, draft, on_tokens,
                                   sampling=sampling, cancel=cancel.is_set)

        return asyncio.get_running_loop().run_in_executor(self.thread, call)

    def close(self) -> None:
        self.thread.shutdown(wait=True)


class Pool:
    """Free workers and waiting requests; used from the event loop only."""

    def __init__(self, pipelines: list[Pipeline], queue: int):
        self.workers = [Worker(i, p) for i, p in enumerate(pipelines)]
        self.free = list(self.workers)
        self.queue = queue
        self.waiting: collections.deque = collections.deque()

    @property
    def busy(self) -> int:
        return len(self.workers) - len(self.free)

    async def acquire(self, prompt: Prompt) -> Worker:
        """A free worker for ``prompt`` (waiting in the queue when none is); ``QueueFull``
        when the queue is full."""
        if not self.free and len(self.waiting) >= self.queue:
            raise QueueFull(f"all {len(self.workers)} workers are busy and {self.queue} "
                            f"requests wait.")
        waiter = asyncio.get_running_loop().create_future()
        self.waiting.append((waiter, prompt))
        self._dispatch()
        try:
            return await waiter
        except asyncio.CancelledError:  # the client left while waiting
            if waiter.done() and not waiter.cancelled():
                self.release(waiter.result())
            raise

    def release(self, worker: Worker) -> None:
        self.free.append(worker)
        self._dispatch()

    def _dispatch(self) -> None:
        while self.free and self.waiting:
            waiter, prompt = self.waiting.popleft()
            if waiter.done():  # cancelled while waiting
                continue
            worker = max(self.free, key=lambda w: w.pipe.session.reusable(prompt))
            self.free.remove(worker)
            waiter.set_result(worker)

    def close(self) -> None:
        for worker in self.workers:
            worker.close()


class TokenStream:
    """Tokens a worker thread emits, handed to the event loop as they come; ``None`` ends."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def __call__(self, tokens: list[int]) -> None:  # on_tokens, in the worker's thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, list(tokens))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    async def get(self) -> list[int] | None:
        return await self.queue.get()


async def generate(pool: Pool, prompt: Prompt, max_new_tokens: int, draft: bool, sampling,
                   stream: TokenStream, cancel: threading.Event) -> GenerationResult:
    """Run one request on a worker of ``pool``. Cancelled (the client left), it sets
    ``cancel``: the generation ends at its next pass, and only then is the worker free."""
    try:
        worker = await pool.acquire(prompt)
    except BaseException:  # the queue was full, or the client left while waiting
        stream.close()
        raise
    running = worker.run(prompt, max_new_tokens, draft, stream, sampling=sampling,
                         cancel=cancel)

    def done(future: asyncio.Future) -> None:
        stream.close()
        pool.release(worker)
        if not future.cancelled():
            future.exception()  # retrieved: a cancelled request's error is nobody's

    running.add_done_callback(done)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        cancel.set()
        raise
