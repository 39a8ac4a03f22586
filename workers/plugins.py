"""Loading handler plugins: modules named in HRFLOW_HANDLERS and installed entry points.

A plugin is a function ``register(registry)`` or ``register(registry, settings)``
that fills the registry it is given; nothing registers on a global at import.
HRFLOW_HANDLERS items are ``package.module`` (its ``register``) or
``package.module:function``. A plugin that cannot load stops the worker at
start-up with the reason: a worker silently missing a handler would drop work.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from hrflow_webhooks.settings import Settings
from workers.registry import Registry

ENTRY_POINT_GROUP = "hrflow_webhooks.handlers"
Plugin = Callable[..., Any]


class PluginError(RuntimeError):
    """A plugin named in the configuration or installed could not be loaded."""


def _load_from_path(path: str) -> Plugin:
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise PluginError(f"HRFLOW_HANDLERS: cannot import {module_name!r}: {error}") from error
    plugin = getattr(module, attribute or "register", None)
    if not callable(plugin):
        raise PluginError(
            f"HRFLOW_HANDLERS: {module_name!r} has no callable {attribute or 'register'!r} "
            "(a plugin is a function register(registry) or register(registry, settings))"
        )
    return plugin  # type: ignore[no-any-return]


def apply_plugin(plugin: Plugin, registry: Registry, settings: Settings) -> None:
    if len(inspect.signature(plugin).parameters) >= 2:
        plugin(registry, settings)
    else:
        plugin(registry)


def installed_plugins() -> dict[str, Plugin]:
    plugins: dict[str, Plugin] = {}
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            plugins[entry_point.name] = entry_point.load()
        except Exception as error:
            raise PluginError(
                f"entry point {entry_point.name!r} ({entry_point.value}) failed to load: {error}"
            ) from error
    return plugins


def build_registry(settings: Settings, *extra: Registry) -> Registry:
    """Installed plugins first, then HRFLOW_HANDLERS in order, then registries given in code."""
    registry = Registry()
    for plugin in installed_plugins().values():
        apply_plugin(plugin, registry, settings)
    for path in settings.handlers:
        apply_plugin(_load_from_path(path), registry, settings)
    for other in extra:
        registry.include(other)
    return registry
