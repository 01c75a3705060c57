"""A state disk that refuses writes is a passing condition, not a bug: callers get
UNAVAILABLE with the reason (`state disk full at /var/lib/picoord`) and may retry."""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from picoord.coordinator.store import StateUnavailable


def unavailable_on_store_fault(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a servicer method (unary or streaming) so StateUnavailable becomes UNAVAILABLE."""
    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in handler(self, request, context):
                    yield item
            except StateUnavailable as error:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))

        return stream

    @functools.wraps(handler)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except StateUnavailable as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))

    return unary
