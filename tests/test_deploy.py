"""The deployment files name things that exist, with flags the tools accept.

The image is not built here (`make test-docker` builds and runs it, as root); instead
the Procfile's and the Dockerfile's commands are parsed and checked against the
package: modules import, the console script and its commands exist, uvicorn
accepts every flag (parsed by uvicorn's own click command), the header limit
fits the largest signed payload, and .env.example lists every setting.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import pytest
import typer
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.routing import Route
from uvicorn.importer import import_from_string
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from control.cli import app as cli_app
from control.commands import (
    PROCFILE,
    WEB,
    console_argv,
    expand,
    procfile_text,
    web_argv,
    worker_argv,
)
from hrflow_webhooks.settings import Settings
from receiver.app import create_app

ROOT = Path(__file__).resolve().parent.parent
PLATFORM_VARIABLES = {"PORT", "WEB_CONCURRENCY"}


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments), with backslash continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    pairs = [line.split(None, 1) for line in lines if line and not line.startswith("#")]
    return [(pair[0].upper(), pair[1] if len(pair) > 1 else "") for pair in pairs]


def base_image(steps: list[tuple[str, str]]) -> str:
    """FROM's image, read from ``ARG NAME=default`` when FROM names ``${NAME}``."""
    [image] = [args.split()[0] for name, args in steps if name == "FROM"]
    variable = re.fullmatch(r"\$\{?(\w+)\}?", image)
    if variable is None:
        return image
    defaults = dict(args.split("=", 1) for name, args in steps if name == "ARG" and "=" in args)
    return defaults[variable[1]]


def uvicorn_context(argv: list[str]) -> click.Context:
    """Parse argv with uvicorn's own CLI definition: unknown flags or bad values raise."""
    assert argv[0] == "uvicorn"
    uvicorn_cli: click.Command = importlib.import_module("uvicorn.main").main
    return uvicorn_cli.make_context("uvicorn", argv[1:])


def script_command(argv: list[str]) -> str:
    """The name of the command `hrflow-webhooks ARGV...` would run (typer's own click)."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] in scripts
    assert scripts[argv[0]] == "control.cli:main"
    commands = typer.main.get_command(cli_app).commands  # type: ignore[attr-defined]
    assert argv[1] in commands, f"no `{argv[0]} {argv[1]}` command"
    return str(commands[argv[1]].name)


def check_receiver_command(argv: list[str]) -> None:
    params = uvicorn_context(argv).params
    # uvicorn calls the factory with no arguments; it builds the receiver app.
    assert params["factory"]
    factory = import_from_string(params["app"])
    inspect.signature(factory).bind()
    built = factory(Settings(webhook_secrets=[SecretStr("deploy-test-secret")]), own_logging=False)
    assert isinstance(built, Starlette)
    assert (params["host"], params["port"]) == ("0.0.0.0", 8000)
    # The receiver's guard protocol, loaded the way uvicorn loads it.
    assert params["http"] == "receiver.protocol:HttpProtocol"
    assert issubclass(import_from_string(params["http"]), HttpToolsProtocol)
    assert params["proxy_headers"] is True
    # Whom to trust for X-Forwarded-For comes from FORWARDED_ALLOW_IPS (uvicorn's variable,
    # loopback by default), never from a flag that trusts every client.
    assert params["forwarded_allow_ips"] is None
    assert params["workers"] == 3  # WEB_CONCURRENCY from the test's environment
    # No flag that only h11 reads: the head limit is HttpProtocol's (HRFLOW_MAX_HEADER_BYTES).
    assert not any(arg.startswith("--h11") for arg in argv)


ENV = {"PORT": "8000", "WEB_CONCURRENCY": "3"}


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    entries = [line.split(":", 1) for line in lines if line.strip()]
    return {name.strip(): command.strip() for name, command in entries}


def test_procfile_is_the_one_source_of_command_lines() -> None:
    assert (ROOT / "Procfile").read_text() == procfile_text()
    assert procfile() == PROCFILE


def test_run_tests_and_bench_start_the_procfile_lines() -> None:
    """``hrflow-webhooks run``, the suites and the bench take their argv from here."""
    argv = web_argv(8123, "127.0.0.1")
    deployed = expand(WEB, {"PORT": "8123"})
    deployed[deployed.index("--host") + 1] = "127.0.0.1"
    assert argv == [sys.executable, "-m", *deployed]
    assert worker_argv() == [sys.executable, "-m", "control.cli", "worker"]


def test_procfile_web_runs_the_receiver_with_router_flags() -> None:
    check_receiver_command(expand(procfile()["web"], ENV))


def test_procfile_web_defaults_work_without_platform_variables() -> None:
    params = uvicorn_context(expand(procfile()["web"], {})).params
    assert (params["port"], params["workers"]) == (8000, 1)


def test_procfile_worker_is_a_command_of_the_console_script() -> None:
    assert procfile().keys() == {"web", "worker", "console"}
    assert script_command(shlex.split(procfile()["worker"])) == "worker"


def test_procfile_console_is_a_command_and_never_on_the_webhook_port() -> None:
    assert script_command(shlex.split(procfile()["console"])) == "console"
    assert "PORT" not in procfile()["console"]  # its own HRFLOW_CONSOLE_PORT, never $PORT
    assert console_argv() == [sys.executable, "-m", "control.cli", "console"]


def test_a_wrong_flag_would_be_caught() -> None:
    with pytest.raises(click.UsageError):
        uvicorn_context(["uvicorn", "receiver.app:create_app", "--proxy-header"])


def test_dockerfile_base_user_and_dependency_layer() -> None:
    steps = dockerfile()
    instructions = [name for name, _ in steps]
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", base_image(steps))
    user = [args for name, args in steps if name == "USER"]
    assert user
    assert user[-1] not in ("root", "0")
    copies = [args for name, args in steps if name == "COPY"]
    assert copies[0].split() == ["requirements.lock", "./"]  # dependencies before the code
    first_code_copy = steps.index(("COPY", copies[1]))
    assert any(
        "pip install --require-hashes -r requirements.lock" in args
        for _, args in steps[:first_code_copy]
    )
    assert instructions.index("USER") > first_code_copy


def test_dockerfile_copies_every_product_package_and_not_the_sandbox() -> None:
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {p.rstrip("*") for p in include["packages"]["find"]["include"]}
    copied = {args.split()[0] for name, args in dockerfile() if name == "COPY"}
    assert packages - {"sandbox"} <= copied
    assert "sandbox" not in copied  # a development component, not production code
    for source in copied:
        assert (ROOT / source).exists()


def test_dockerfile_cmd_is_the_same_receiver_command() -> None:
    [cmd] = [args for name, args in dockerfile() if name == "CMD"]
    shell, flag, script = json.loads(cmd)
    assert (shell, flag) == ("sh", "-c")
    assert script.startswith("exec ")  # uvicorn becomes PID 1 and gets SIGTERM
    check_receiver_command(expand(script.removeprefix("exec "), ENV))
    assert expand(script.removeprefix("exec "), ENV) == expand(WEB, ENV)
    env_lines = " ".join(args for name, args in dockerfile() if name == "ENV")
    assert "PORT=8000" in env_lines
    assert ("EXPOSE", "8000") in dockerfile()


def test_dockerfile_healthcheck_uses_real_endpoints_and_commands() -> None:
    [check] = [args for name, args in dockerfile() if name == "HEALTHCHECK"]
    assert "/healthz" in check
    app = create_app(Settings(webhook_secrets=[SecretStr("deploy-test-secret")]), own_logging=False)
    assert "/healthz" in {route.path for route in app.routes if isinstance(route, Route)}
    assert all(isinstance(r, Route) for r in app.routes)
    assert script_command(["hrflow-webhooks", "check"]) == "check"
    assert "hrflow-webhooks check" in check


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".run", ".env"} <= ignored


def settings_variables() -> set[str]:
    """Each Settings field's environment variable (its first alias, else the prefixed name)."""
    names: set[str] = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        choices = getattr(alias, "choices", None)
        names.add(str(choices[0]) if choices else f"HRFLOW_{name.upper()}")
    return names


def test_env_example_lists_every_setting_and_nothing_else() -> None:
    text = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, flags=re.MULTILINE))
    assert settings_variables() - listed == set()
    assert listed - settings_variables() - PLATFORM_VARIABLES == set()


def test_env_example_defaults_are_the_settings_defaults() -> None:
    text = (ROOT / ".env.example").read_text()
    values = dict(re.findall(r"^#\s*(HRFLOW_[A-Z0-9_]+)=(.+)$", text, flags=re.MULTILINE))
    defaults = Settings()
    assert values["HRFLOW_MAX_BODY_BYTES"] == str(defaults.max_body_bytes)
    assert values["HRFLOW_JOB_TIMEOUT_S"] == str(defaults.job_timeout_s)
    assert values["HRFLOW_QUEUE_NAME"] == defaults.queue_name
    assert values["HRFLOW_SHUTDOWN_GRACE_S"] == str(defaults.shutdown_grace_s)


def test_make_run_installs_then_runs_the_console_script() -> None:
    makefile = (ROOT / "Makefile").read_text()
    target = re.search(r"^run:(.*)\n((?:\t.*\n)+)", makefile, flags=re.MULTILINE)
    assert target is not None
    prerequisites, recipe = target[1].split(), target[2].split()
    assert "$(STAMP)" in prerequisites  # the venv is created first on a fresh machine
    assert "redis-server" in prerequisites  # the embedded Redis needs the binary
    assert recipe[:2] == ["$(BIN)/hrflow-webhooks", "run"]
    assert script_command(["hrflow-webhooks", "run"]) == "run"


def test_readme_shows_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "$ make run" in readme
    assert "$ make test" in readme


def test_readme_configuration_table_has_a_row_for_every_setting_and_no_other() -> None:
    section = (ROOT / "README.md").read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `([A-Z_]+)`", section, flags=re.MULTILINE))
    assert rows == settings_variables() | {"PORT"}  # PORT's row also names WEB_CONCURRENCY


def test_the_lock_files_pin_every_dependency_within_pyprojects_ranges() -> None:
    """make test and the Dockerfile install from the lock files; pyproject.toml keeps ranges."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for lock, requirements in (
        ("requirements.lock", project["dependencies"]),
        (
            "requirements-dev.lock",
            project["dependencies"] + project["optional-dependencies"]["dev"],
        ),
    ):
        pinned = dict(
            re.findall(r"^([A-Za-z0-9_.-]+)==([^\s\\]+)", (ROOT / lock).read_text(), re.M)
        )
        pinned = {canonicalize_name(name): version for name, version in pinned.items()}
        for line in requirements:
            requirement = Requirement(line)
            version = pinned.get(canonicalize_name(requirement.name))
            assert version is not None, f"{requirement.name} is not in {lock}"
            assert requirement.specifier.contains(version), f"{lock}: {requirement} vs {version}"


def test_the_developers_environment_does_not_reach_the_tests() -> None:
    """HRFLOW_MAX_TRIES=1 or a REDIS_URL in the shell once failed tests (tests/conftest.py)."""
    env = {
        **os.environ,
        "HRFLOW_MAX_TRIES": "1",
        "HRFLOW_JOB_TIMEOUT_S": "30",
        "REDIS_URL": "redis://nowhere.invalid:1/0",
    }
    test = "tests/test_deploy.py::test_env_example_defaults_are_the_settings_defaults"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2_000:]


def test_readme_shows_the_procfile_as_it_is() -> None:
    readme = (ROOT / "README.md").read_text()
    shown = re.search(r"```Procfile\n(.*?)```", readme, flags=re.DOTALL)
    assert shown is not None
    assert shown[1] == (ROOT / "Procfile").read_text()
