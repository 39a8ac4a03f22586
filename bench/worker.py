"""A bench worker process: the product's arq worker with handlers named on the command line.

``python -m bench.worker bench.handlers:register [--arq-defaults]``. Handlers are
loaded like HRFLOW_HANDLERS plugins but without the installed entry points, so a
row measures exactly the handlers it names. ``--arq-defaults`` puts back arq's
own poll delay and job limit: P3's baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
from typing import Any

from hrflow_webhooks.logs import configure_logging
from hrflow_webhooks.settings import Settings
from workers.plugins import apply_plugin
from workers.process import event_loop_factory
from workers.registry import Registry
from workers.settings import create_worker

ARQ_DEFAULTS: dict[str, Any] = {"poll_delay": 0.5, "max_jobs": 10, "queue_read_limit": None}


def load_registry(plugin_paths: list[str], settings: Settings) -> Registry:
    registry = Registry()
    for path in plugin_paths:
        module_name, _, attribute = path.partition(":")
        plugin = getattr(importlib.import_module(module_name), attribute or "register")
        apply_plugin(plugin, registry, settings)
    return registry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("plugins", nargs="+", help="module:function registering handlers")
    parser.add_argument("--arq-defaults", action="store_true")
    args = parser.parse_args()
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    # The loop `hrflow-webhooks worker` runs on (uvloop when installed); arq's Worker
    # takes the current loop when it is built.
    asyncio.set_event_loop(event_loop_factory()())
    overrides = ARQ_DEFAULTS if args.arq_defaults else {}
    worker = create_worker(settings, load_registry(args.plugins, settings), **overrides)
    worker.run()


if __name__ == "__main__":
    main()
