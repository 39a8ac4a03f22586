"""The handler registry: SDK-compatible names, decorator, plugins, merging, validation."""

from __future__ import annotations

import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from hrflow_webhooks.events import Event, UnknownEventNameError
from hrflow_webhooks.settings import Settings
from tests.redis_server import RedisServer
from tests.service import drain, make_settings, parsing_event, receiver
from workers.context import HandlerContext
from workers.plugins import PluginError, build_registry
from workers.registry import Registry, adapt_callback


def test_sdk_camel_case_names_work_like_the_sdk() -> None:
    registry = Registry()

    def on_parsed(data: Any, event_type: str) -> None: ...

    assert registry.isHandlerPresent("profile.parsing.success") is False
    registry.setHandler("profile.parsing.success", on_parsed)
    assert registry.isHandlerPresent("profile.parsing.success") is True
    registry.removeHandler("profile.parsing.success")
    assert registry.isHandlerPresent("profile.parsing.success") is False


def test_legacy_and_current_names_are_one_event() -> None:
    registry = Registry()
    registry.set_handler("profile.parse.success", lambda event: None)
    assert registry.is_handler_present("profile.parsing.success")
    assert [h.event_type for h in registry] == ["profile.parsing.success"]


def test_decorator_registers_and_returns_the_function() -> None:
    registry = Registry()

    async def on_update(event: Event, ctx: HandlerContext) -> None: ...

    # The function itself, not a wrapper (a functools.wraps wrapper keeps its __name__ too).
    assert registry.on("profile.storing.update")(on_update) is on_update
    assert [h.callback for h in registry.handlers_for("profile.storing.update")] == [on_update]


def test_several_handlers_for_one_event_keep_their_order_and_remove_one_by_one() -> None:
    registry = Registry()

    def first(event: Event) -> None: ...

    def second(event: Event) -> None: ...

    registry.set_handler("profile.parsing.success", first)
    registry.set_handler("profile.parsing.success", second)
    registry.set_handler("profile.parsing.success", first)  # same handler again: no duplicate
    assert [h.callback for h in registry.handlers_for("profile.parsing.success")] == [first, second]
    registry.remove_handler("profile.parsing.success", first)
    assert [h.callback for h in registry.handlers_for("profile.parsing.success")] == [second]


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("profile.parsing.succes", "profile.parsing.success"),
        ("profile.parsed", "expected '<object>.<step>.<status>'"),
        ("", "expected"),
    ],
)
def test_invalid_event_names_are_rejected_with_a_clear_error(name: str, hint: str) -> None:
    registry = Registry()
    with pytest.raises(UnknownEventNameError, match=hint.replace(".", r"\.")):
        registry.set_handler(name, lambda event: None)
    with pytest.raises(UnknownEventNameError):
        registry.is_handler_present(name)


def test_unknown_names_can_be_registered_on_purpose() -> None:
    registry = Registry()
    registry.add("profile.teleporting.success", lambda event: None, allow_unknown=True)
    assert registry.event_types() == ["profile.teleporting.success"]


def test_two_different_callbacks_with_one_name_are_refused() -> None:
    registry = Registry()
    registry.add("profile.parsing.success", lambda event: None, name="same")
    with pytest.raises(ValueError, match="pass name="):
        registry.add("profile.parsing.success", lambda event: None, name="same")


def test_callbacks_with_wrong_arity_are_refused_at_registration() -> None:
    registry = Registry()
    with pytest.raises(TypeError, match="takes 3 positional arguments"):
        registry.set_handler("profile.parsing.success", lambda a, b, c: None)
    with pytest.raises(TypeError, match="not callable"):
        registry.set_handler("profile.parsing.success", "nope")  # type: ignore[arg-type]


def test_registries_merge() -> None:
    mine, theirs = Registry(), Registry()
    mine.add("profile.parsing.success", lambda event: None, name="a")
    theirs.add("job.parsing.success", lambda event: None, name="b")
    merged = Registry(mine, theirs)
    assert merged.event_types() == ["job.parsing.success", "profile.parsing.success"]
    assert len(merged) == 2


async def test_every_callback_shape_gets_what_the_sdk_would_give_it() -> None:
    event = Event.from_payload(parsing_event())
    calls: dict[str, Any] = {}
    main_thread = threading.get_ident()

    def sync_one(data: Any) -> None:
        calls["sync_one"] = (dict(data), threading.get_ident() != main_thread)

    def sync_two(data: Any, event_type: str) -> None:
        calls["sync_two"] = (data["profile"]["key"], event_type)

    async def async_two(data: Any, event_type: str) -> None:
        calls["async_two"] = event_type

    async def native(event: Event, ctx: HandlerContext) -> None:
        calls["native"] = ctx

    class CallableObject:
        async def __call__(self, data: Any) -> None:
            calls["object"] = data.id

    context = object()
    for callback in (sync_one, sync_two, async_two, native, CallableObject()):
        await adapt_callback(callback)(event, context)  # type: ignore[arg-type]
    assert calls == {
        "sync_one": (parsing_event(), True),  # sync callbacks run off the event loop's thread
        "sync_two": ("pk-1", "profile.parsing.success"),
        "async_two": "profile.parsing.success",
        "native": context,
        "object": event.id,
    }


PLUGIN_SOURCE = """
def register(registry, settings):
    async def {name}(event, ctx):
        await ctx.redis.rpush("plugin-calls", "{name}:" + event.id)
    registry.on("profile.parsing.success", name="{name}")({name})
"""


def _write_module(directory: Path, name: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(PLUGIN_SOURCE.format(name=name)))


def _write_distribution(directory: Path, module: str) -> None:
    """An installed distribution publishing ``module:register`` in our entry-point group."""
    dist_info = directory / f"{module}-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(
        f"[hrflow_webhooks.handlers]\n{module} = {module}:register\n"
    )


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("hrflow_test_plugin")]:
        del sys.modules[name]


async def test_env_and_entry_point_plugins_fill_the_registry_and_run(
    redis: Redis, redis_server: RedisServer, plugin_dir: Path, http: aiohttp.ClientSession
) -> None:
    _write_module(plugin_dir, "hrflow_test_plugin_env")
    _write_module(plugin_dir, "hrflow_test_plugin_published")
    _write_distribution(plugin_dir, "hrflow_test_plugin_published")
    settings = make_settings(redis_server.url, handlers="hrflow_test_plugin_env")
    registry = build_registry(settings)
    names = {h.name for h in registry.handlers_for("profile.parsing.success")}
    assert {"hrflow_test_plugin_env", "hrflow_test_plugin_published"} <= names

    async with receiver(settings) as server:
        status, body = await server.post(http, parsing_event())
    assert status == 202
    await drain(settings, registry)
    calls = sorted(c.decode() for c in await redis.lrange("plugin-calls", 0, -1))  # type: ignore[misc]
    event_id = body["event_ids"][0]
    assert calls == [
        f"hrflow_test_plugin_env:{event_id}",
        f"hrflow_test_plugin_published:{event_id}",
    ]


def test_a_missing_plugin_stops_the_worker_with_the_reason(plugin_dir: Path) -> None:
    with pytest.raises(PluginError, match="cannot import 'no_such_plugin_module'"):
        build_registry(Settings(handlers=["no_such_plugin_module"]))
    (plugin_dir / "hrflow_test_plugin_empty.py").write_text("x = 1\n")
    with pytest.raises(PluginError, match="no callable 'register'"):
        build_registry(Settings(handlers=["hrflow_test_plugin_empty"]))
