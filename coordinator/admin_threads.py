"""The admin socket's gRPC server: threads take the calls, the event loop runs them.

At 5,000 sessions the event loop is rarely idle, and a call served by a `grpc.aio` server
waits for several of its turns (the call, its request, the handler, the answer): admin p99
was 0.8-1 s with every handler taking 0.1 ms. Here a `grpc.server` takes each call in a
thread of its own, and:
- `nodes` and `top` from a local operator are answered in that thread from a snapshot
  already built (`AdminServicer.answers_at_once`): a snapshot is never changed once built,
  and the thread waits only for the GIL, which the loop hands over every few milliseconds;
- every other call, or one of those that needs a build or a check first, runs its servicer
  method on the loop as before (`asyncio.run_coroutine_threadsafe`), since the cluster's
  state lives there. The method sees a `LoopContext`: the call's peer and certificate, and
  an `abort` that ends the call from its thread.

Only the admin socket's server is threaded (the remote admin listener serves a few
operators over TLS and stays on the loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import grpc

from picoord.coordinator.servicers.peers import is_local_operator

# Threads taking calls. A streaming call (`logs -f`, a rollout being watched) holds one
# while it lasts; past this many calls at once a caller gets RESOURCE_EXHAUSTED at once
# rather than waiting for a thread.
ADMIN_THREADS = 32
CLOSE_TIMEOUT = 5.0  # for a stream's generator to finish on the loop once its caller left


class Aborted(Exception):
    """What `LoopContext.abort` raises on the loop; the call's thread ends the call with it."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class LoopContext:
    """The part of a call's context the servicers use, for a call taken by a thread and run
    on the event loop (`grpc.aio.ServicerContext`'s own methods must run on its loop)."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context

    def peer(self) -> str:
        return self._context.peer()

    def auth_context(self) -> Mapping[str, list[bytes]]:
        return self._context.auth_context()

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise Aborted(code, details)


class ThreadedServicer:
    """`servicer`'s methods as a `grpc.server` calls them: each runs on `loop`, unless its
    name is in `at_once` and that answers from the call's thread."""

    def __init__(
        self,
        servicer: object,
        loop: asyncio.AbstractEventLoop,
        at_once: Mapping[str, Callable[[Any], Any | None]] | None = None,
    ) -> None:
        self._servicer = servicer
        self._loop = loop
        self._at_once = dict(at_once or {})

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._servicer, name)
        if inspect.isasyncgenfunction(method):
            return self._stream(method)
        return self._unary(method, self._at_once.get(name))

    def _unary(
        self, method: Callable[..., Any], at_once: Callable[[Any], Any | None] | None
    ) -> Callable[[Any, grpc.ServicerContext], Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            if at_once is not None and is_local_operator(context):
                answer = at_once(request)
                if answer is not None:
                    return answer
            running = asyncio.run_coroutine_threadsafe(method(request, LoopContext(context)), self._loop)
            context.add_callback(running.cancel)  # the caller left, or its deadline passed
            return _result(running, context)

        return call

    def _stream(self, method: Callable[..., AsyncIterator[Any]]) -> Callable[..., Iterator[Any]]:
        def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            items = method(request, LoopContext(context))
            pending: list[concurrent.futures.Future[Any]] = []
            context.add_callback(lambda: [each.cancel() for each in pending])
            try:
                while True:
                    step = asyncio.run_coroutine_threadsafe(_next(items), self._loop)
                    pending[:] = [step]
                    try:
                        yield _result(step, context)
                    except StopAsyncIteration:
                        return
            finally:
                closing = asyncio.run_coroutine_threadsafe(_close(items), self._loop)
                with contextlib.suppress(Exception):  # it failed or timed out: the call is over
                    closing.result(CLOSE_TIMEOUT)

        return call


def _result(running: concurrent.futures.Future[Any], context: grpc.ServicerContext) -> Any:
    """What the loop's part of a call gave, or the call ended as its method said."""
    try:
        return running.result()
    except Aborted as aborted:
        context.abort(aborted.code, aborted.details)
    except concurrent.futures.CancelledError:
        context.abort(grpc.StatusCode.CANCELLED, "the call ended before its answer")


async def _next(items: AsyncIterator[Any]) -> Any:
    return await items.__anext__()


async def _close(items: AsyncIterator[Any]) -> None:
    await items.aclose()  # type: ignore[attr-defined]


class ThreadedServer:
    """A `grpc.server` on its threads, stopped from the event loop."""

    def __init__(self, options: list[tuple[str, Any]]) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(ADMIN_THREADS, thread_name_prefix="admin")
        self.server = grpc.server(self._pool, options=options, maximum_concurrent_rpcs=ADMIN_THREADS)

    def start(self) -> None:
        self.server.start()

    async def stop(self, grace: float | None) -> None:
        stopped = self.server.stop(grace)
        await asyncio.to_thread(stopped.wait)
        self._pool.shutdown(wait=False, cancel_futures=True)
