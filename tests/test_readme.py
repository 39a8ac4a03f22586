"""README.md stays true: the two commands, and a configuration row for every setting."""

from __future__ import annotations

import re
from pathlib import Path

from hrflow_webhooks.settings import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def env_names() -> set[str]:
    names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        choices = getattr(alias, "choices", None)
        names.add(str(choices[0]) if choices else f"HRFLOW_{name.upper()}")
    return names


def test_readme_shows_the_two_commands() -> None:
    assert "$ make run" in README
    assert "$ make test" in README


def test_the_configuration_table_has_a_row_for_every_setting_and_no_other() -> None:
    section = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `([A-Z_]+)`", section, flags=re.MULTILINE))
    platform = {"PORT"}  # the row for PORT and WEB_CONCURRENCY, read by the Procfile only
    assert rows == env_names() | platform
