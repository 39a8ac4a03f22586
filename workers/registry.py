"""The handler registry: an object plugins fill, merge and query.

Registration speaks the HrFlow SDK's language (``setHandler``,
``isHandlerPresent``, ``removeHandler``) and adds a decorator. Names are
checked when a handler is registered, legacy names are stored under today's
name, and every callback is adapted once, at registration, to one shape:
``async def run(event, ctx) -> None``.

Callback shapes accepted, sync or async (sync ones run in a thread):

- ``f(event)``                 the SDK's one-argument form
- ``f(event, event_type)``     the SDK's two-argument form
- ``f(event, ctx)``            native: the second parameter is named ``ctx`` or
                               annotated ``HandlerContext``
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from hrflow_webhooks.events import Event, canonical_event_name, checked_event_name

if TYPE_CHECKING:
    from workers.context import HandlerContext

HandlerFunc = Callable[["Event", "HandlerContext"], Coroutine[Any, Any, None]]
Callback = Callable[..., Any]
C = TypeVar("C", bound=Callback)


@dataclass(frozen=True, slots=True)
class Handler:
    name: str  # stable across processes: completion markers and dead letters use it
    event_type: str  # canonical
    callback: Callback
    run: HandlerFunc
    sources: frozenset[str] | None = None  # None: events of every source

    def accepts_source(self, source_key: str | None) -> bool:
        """HrFlow configures webhooks per workspace, not per source: handlers pick sources."""
        return self.sources is None or source_key in self.sources


def _sources(sources: Iterable[str] | None) -> frozenset[str] | None:
    if sources is None:
        return None
    if isinstance(sources, str):
        raise TypeError(f"sources must be a list of source keys, not the string {sources!r}")
    chosen = frozenset(sources)
    return chosen or None  # an empty list means no filter, as an unset setting does


def _wants_context(parameter: inspect.Parameter) -> bool:
    annotation = parameter.annotation
    named = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    return parameter.name == "ctx" or named.endswith("HandlerContext")


def _positional_count(callback: Callback) -> list[inspect.Parameter]:
    parameters = inspect.signature(callback).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p for p in parameters if p.kind in kinds]


def _is_async(callback: Callback) -> bool:
    return inspect.iscoroutinefunction(callback) or inspect.iscoroutinefunction(
        getattr(callback, "__call__", None)  # noqa: B004 (callable objects with async __call__)
    )


def adapt_callback(callback: Callback) -> HandlerFunc:
    """One calling convention for every accepted callback shape."""
    if not callable(callback):
        raise TypeError(f"{callback!r} is not callable")
    parameters = _positional_count(callback)
    if not 1 <= len(parameters) <= 2:
        raise TypeError(
            f"handler {callback!r} must take (event), (event, event_type) or (event, ctx); "
            f"it takes {len(parameters)} positional arguments"
        )

    def arguments(event: Event, ctx: HandlerContext) -> tuple[Any, ...]:
        if len(parameters) == 1:
            return (event,)
        return (event, ctx) if _wants_context(parameters[1]) else (event, event.type)

    if _is_async(callback):

        async def run_async(event: Event, ctx: HandlerContext) -> None:
            await callback(*arguments(event, ctx))

        return run_async

    async def run_in_thread(event: Event, ctx: HandlerContext) -> None:
        # Sync callbacks (the SDK's kind) may block: keep them off the event loop.
        thread = asyncio.ensure_future(
            asyncio.to_thread(functools.partial(callback, *arguments(event, ctx)))
        )
        try:
            await asyncio.shield(thread)
        except asyncio.CancelledError:
            # A thread cannot be cancelled. Past the run's deadline (or on a stop) the run
            # waits for it before it moves on, so that neither the run's retry nor its
            # subject's next run overlaps a callback that is still running.
            await _until_done(thread)
            raise

    return run_in_thread


async def _until_done(future: asyncio.Future[Any]) -> None:
    while not future.done():
        with contextlib.suppress(asyncio.CancelledError):  # arq's timer, then a stop: still wait
            await asyncio.wait({future})


def handler_name(callback: Callback) -> str:
    module = getattr(callback, "__module__", None) or type(callback).__module__
    qualname = getattr(callback, "__qualname__", None) or type(callback).__qualname__
    return f"{module}.{qualname}"


class Registry:
    """Handlers by canonical event type. ``Registry(a, b)`` merges registries."""

    def __init__(self, *registries: Registry) -> None:
        self._handlers: dict[str, list[Handler]] = {}
        for registry in registries:
            self.include(registry)

    # --- registration -------------------------------------------------------------------------

    def add(
        self,
        event_name: str,
        callback: Callback,
        *,
        name: str | None = None,
        allow_unknown: bool = False,
        sources: Iterable[str] | None = None,
    ) -> Handler:
        """Register ``callback``; ``sources``: only events of these source keys reach it."""
        event_type = (
            canonical_event_name(event_name) if allow_unknown else checked_event_name(event_name)
        )
        handler = Handler(
            name or handler_name(callback),
            event_type,
            callback,
            adapt_callback(callback),
            _sources(sources),
        )
        return self._store(handler)

    def _store(self, handler: Handler) -> Handler:
        handlers = self._handlers.setdefault(handler.event_type, [])
        for i, existing in enumerate(handlers):
            if existing.name == handler.name:
                if existing.callback is not handler.callback:
                    raise ValueError(
                        f"another handler named {handler.name!r} is registered for "
                        f"{handler.event_type!r}: pass name= to tell them apart"
                    )
                handlers[i] = handler
                return handler
        handlers.append(handler)
        return handler

    def on(
        self,
        event_name: str,
        *,
        name: str | None = None,
        allow_unknown: bool = False,
        sources: Iterable[str] | None = None,
    ) -> Callable[[C], C]:
        """Decorator: ``@registry.on("profile.parsing.success", sources=["my-source"])``."""

        def decorate(callback: C) -> C:
            self.add(event_name, callback, name=name, allow_unknown=allow_unknown, sources=sources)
            return callback

        return decorate

    def set_handler(self, event_name: str, callback: Callback, **options: Any) -> None:
        """SDK-compatible: register ``callback`` for ``event_name`` (legacy names accepted)."""
        self.add(event_name, callback, **options)

    def is_handler_present(self, event_name: str) -> bool:
        return bool(self._handlers.get(checked_event_name(event_name)))

    def remove_handler(self, event_name: str, callback: Callback | None = None) -> None:
        """Remove every handler of ``event_name``, or only ``callback``."""
        event_type = checked_event_name(event_name)
        if callback is None:
            self._handlers.pop(event_type, None)
            return
        remaining = [h for h in self._handlers.get(event_type, []) if h.callback is not callback]
        self._handlers[event_type] = remaining

    # The HrFlow SDK's names, so `client.webhooks.setHandler(...)` code migrates by renaming.
    setHandler = set_handler
    isHandlerPresent = is_handler_present
    removeHandler = remove_handler

    def include(self, other: Registry) -> None:
        for handler in other:
            self._store(handler)

    # --- lookup -------------------------------------------------------------------------------

    def handlers_for(self, canonical_type: str) -> tuple[Handler, ...]:
        return tuple(self._handlers.get(canonical_type, ()))

    def __iter__(self) -> Iterator[Handler]:
        for handlers in self._handlers.values():
            yield from handlers

    def __len__(self) -> int:
        return sum(len(handlers) for handlers in self._handlers.values())

    def event_types(self) -> list[str]:
        return sorted(t for t, handlers in self._handlers.items() if handlers)
