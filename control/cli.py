"""The ``hrflow-webhooks`` command: thin commands over the receiver, workers, queue and sandbox.

::

    hrflow-webhooks run            everything on one machine (what `make run` does)
    hrflow-webhooks worker         one arq worker that survives Redis outages
    hrflow-webhooks sandbox        the HrFlow-compatible sandbox API on its own
    hrflow-webhooks console        the operator console, on a port of its own
    hrflow-webhooks send TYPE      sign and post an event the way HrFlow does
    hrflow-webhooks dead-letters   list | show ID | replay ID | replay --all | purge ID
    hrflow-webhooks erase          remove every trace of a profile from Redis
    hrflow-webhooks check          exit 1 when Redis, workers or the queue are unhealthy

Each command builds one ``Settings`` from the environment at its edge. Nothing
here prints profile contents: dead letters are shown with their keys only.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import aiohttp
import orjson
import typer
from pydantic import SecretStr
from redis.exceptions import RedisError

from control import runner
from control.erasure import NOT_REACHED, erase_profile, rewrite_files
from hrflow_webhooks.event_log import RebuildRefusedError
from hrflow_webhooks.events import UnknownEventNameError, canonical_event_name, checked_event_name
from hrflow_webhooks.queue import QueueKeys
from hrflow_webhooks.redis_setup import connect_redis, unreachable_reason
from hrflow_webhooks.settings import Settings
from hrflow_webhooks.signatures import Scheme, sign

T = TypeVar("T")

app = typer.Typer(
    help="Receive HrFlow.ai webhooks safely and act on them reliably.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: no "<bool>" beside every flag
)
dead_letters_app = typer.Typer(help="Inspect, replay and purge dead letters.", no_args_is_help=True)
app.add_typer(dead_letters_app, name="dead-letters")

DEFAULT_WEBHOOK_URL = "http://127.0.0.1:8000/webhook"
SIGNATURE_HEADER = "HTTP-HRFLOW-SIGNATURE"
StateDir = Annotated[
    Path, typer.Option(help="Where `run` keeps its webhook secret and Redis data.")
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hrflow-webhooks {importlib.metadata.version('hrflow-webhooks')}")
        raise typer.Exit


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Receive HrFlow.ai webhooks safely and act on them reliably."""


def without_password(url: str) -> str:
    """A Redis URL fit to print: its password, if any, masked."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:" if parts.username else ":"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}***@{host}"))


def service_settings(state_dir: Path) -> Settings:
    """Settings from the environment; without REDIS_URL, the Redis of a `run` running from
    ``state_dir`` (its embedded one is not on Redis's default port)."""
    settings = Settings()
    if "redis_url" in settings.model_fields_set:  # REDIS_URL, HRFLOW_REDIS_URL or .env
        return settings
    running = runner.running_service_env(state_dir)
    if "REDIS_URL" not in running:
        return settings
    typer.echo(
        f"using the Redis of `hrflow-webhooks run` (pid {running.get('RUN_PID', '?')}): "
        f"{without_password(running['REDIS_URL'])}",
        err=True,
    )
    sandbox = {}
    if settings.api_key is None and "HRFLOW_API_URL" in running:  # `run`'s sandbox API
        sandbox = {
            "api_url": running["HRFLOW_API_URL"],
            "api_key": SecretStr(running.get("HRFLOW_API_KEY", "")),
            "api_user": running.get("HRFLOW_API_USER"),
        }
        if not settings.edit_tags and running.get("HRFLOW_EDIT_TAGS"):  # the demo's handler
            sandbox["edit_tags"] = Settings.model_validate(
                {"edit_tags": running["HRFLOW_EDIT_TAGS"]}
            ).edit_tags
    return settings.model_copy(update={"redis_url": running["REDIS_URL"], **sandbox})


def against_redis(work: Coroutine[Any, Any, T]) -> T:
    """Run a command's work on Redis; Redis unreachable is one line, as `check` says it."""
    try:
        return asyncio.run(work)
    except (RedisError, OSError) as error:
        raise fail(f"redis is unreachable: {unreachable_reason(error)}") from None


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


# --- run, worker, sandbox ---------------------------------------------------------------------


@app.command()
def run(
    port: Annotated[int, typer.Option(help="Receiver port.")] = 8000,
    host: Annotated[str, typer.Option(help="Receiver interface.")] = "127.0.0.1",
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    sandbox: Annotated[
        bool | None,
        typer.Option(
            "--sandbox/--no-sandbox",
            help="Sandbox HrFlow API [default: on if HRFLOW_API_KEY unset]",
        ),
    ] = None,
    sandbox_port: Annotated[int, typer.Option(help="Sandbox API port.")] = 8001,
    redis_port: Annotated[int, typer.Option(help="Embedded Redis port (REDIS_URL unset).")] = 6390,
    state_dir: StateDir = runner.DEFAULT_STATE_DIR,
    console_port: Annotated[
        int | None, typer.Option(help="Console port [default: HRFLOW_CONSOLE_PORT, 8100]")
    ] = None,
) -> None:
    """Run Redis (unless REDIS_URL is set), the sandbox API, the receiver, the console and
    workers."""
    options = runner.RunOptions(
        host, port, workers, sandbox, sandbox_port, redis_port, state_dir, console_port
    )
    try:
        code = runner.run(Settings(), options)
    except runner.RunError as error:
        raise fail(str(error)) from None
    raise typer.Exit(code)


@app.command()
def worker() -> None:
    """Run one arq worker; it restarts itself after a Redis outage instead of dying."""
    from hrflow_webhooks.logs import configure_logging
    from workers.process import run_worker
    from workers.settings import create_worker

    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    run_worker(settings, lambda: create_worker(settings, handle_signals=False))


@app.command("sandbox")
def sandbox_command(
    port: Annotated[int, typer.Option()] = 8001,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    seed: Annotated[bool, typer.Option("--seed/--no-seed", help="Load the seed profiles.")] = True,
    latency_ms: Annotated[float, typer.Option(min=0, help="Added to every API answer.")] = 0.0,
    fail_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of API calls answered with --status.")
    ] = 0.0,
    status: Annotated[int, typer.Option(help="Status of injected failures.")] = 500,
    webhook_url: Annotated[
        str | None,
        typer.Option(
            help="POST a signed profile.parsing.success here on each add, "
            "profile.storing.update on each edit."
        ),
    ] = None,
    webhook_secret: Annotated[str | None, typer.Option(help="Secret that signs them.")] = None,
    drop_webhooks: Annotated[
        bool,
        typer.Option(
            "--drop-webhooks",
            help="Drop every webhook, counted at /_sandbox/webhooks (missed deliveries).",
        ),
    ] = False,
    update_webhooks: Annotated[
        bool,
        typer.Option(
            "--update-webhooks/--no-update-webhooks",
            help="Send profile.storing.update after each edit.",
        ),
    ] = True,
) -> None:
    """Run the sandbox HrFlow API (api key sandbox-api-key, user sandbox@hrflow.local)."""
    sandbox = _sandbox_package()
    sandbox.run_sandbox(
        host=host,
        port=port,
        latency_ms=latency_ms,
        fail_rate=fail_rate,
        status=status,
        seed=seed,
        webhook_url=webhook_url,
        webhook_secret=webhook_secret,
        drop_webhooks=drop_webhooks,
        update_webhooks=update_webhooks,
    )


def _sandbox_package() -> Any:
    """The sandbox, a development component: a checkout has it, the production image not."""
    try:
        import sandbox
    except ImportError:
        raise fail(
            "the sandbox is not installed here (it is left out of the production image)"
        ) from None
    return sandbox


# --- console ----------------------------------------------------------------------------------


@app.command()
def console(
    state_dir: StateDir = runner.DEFAULT_STATE_DIR,
    public_port: Annotated[
        str | None,
        # The platform's public port, read only to refuse serving the console on it.
        typer.Option(envvar="PORT", hidden=True),
    ] = None,
) -> None:
    """Serve the operator console on HRFLOW_CONSOLE_HOST:HRFLOW_CONSOLE_PORT (127.0.0.1:8100)."""
    from control.console.serve import ConsoleSetupError, serve

    settings = service_settings(state_dir)
    try:
        serve(settings, public_port, typer.echo)
    except ConsoleSetupError as error:
        raise fail(str(error)) from None


# --- send -------------------------------------------------------------------------------------


def event_payload(
    event_type: str, profile_key: str, source_key: str, message: str | None = None
) -> dict[str, Any]:
    """An event as HrFlow sends it: the object's key and its source (or board) key."""
    obj = canonical_event_name(event_type).split(".", 1)[0]
    payload: dict[str, Any] = {
        "type": event_type,
        "origin": "api",
        "message": message or _default_message(event_type),
    }
    if obj == "job":
        payload["job"] = {"key": profile_key, "reference": None, "board": {"key": source_key}}
    else:
        payload["profile"] = {"key": profile_key, "reference": None, "source": {"key": source_key}}
    return payload


def _default_message(event_type: str) -> str:
    """HrFlow's wording: ``profile.parsing.success`` → "Profile parsing success"."""
    obj = canonical_event_name(event_type).split(".", 1)[0]
    return f"{obj.capitalize()} {event_type.split('.', 1)[-1].replace('.', ' ')}"


def delivery_bodies(
    event_type: str,
    profile_key: str,
    source_key: str,
    count: int,
    as_array: bool,
    message: str | None = None,
) -> list[bytes]:
    """``count`` distinct events (their messages differ, so dedup keeps them apart).

    Without ``message``, each run of `send` says when it was sent: the same command run
    again (after `run` restarts, say, with Redis remembering the first) is a new event, not
    a duplicate. With ``message``, the same command sends the same bytes, as HrFlow's
    retries do."""
    if message is None:
        sent = datetime.now(UTC).isoformat(timespec="milliseconds")
        message = f"{_default_message(event_type)} (sent by hrflow-webhooks send at {sent})"
    if count == 1:
        events = [event_payload(event_type, profile_key, source_key, message)]
    else:
        events = [
            event_payload(event_type, profile_key, source_key, f"{message}, {n} of {count}")
            for n in range(1, count + 1)
        ]
    if as_array:
        return [orjson.dumps(events)]
    return [orjson.dumps(event) for event in events]


def resolve_secret(secret: str | None, state_dir: Path) -> str:
    if secret:
        return secret
    settings = Settings()
    if settings.webhook_secrets:
        return settings.webhook_secrets[0].get_secret_value()
    path = state_dir / runner.SECRET_FILE_NAME
    if path.exists():
        return path.read_text().strip()
    raise fail(f"no secret: pass --secret, set HRFLOW_WEBHOOK_SECRET, or start `run` ({path})")


async def post_signed(url: str, body: bytes, secret: str, scheme: Scheme) -> tuple[int, str]:
    headers = {SIGNATURE_HEADER: sign(body, secret.encode(), scheme)}
    headers["Content-Type"] = "application/json"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=headers) as response,
    ):
        return response.status, await response.text()


@app.command()
def send(
    event_type: Annotated[str, typer.Argument(help="e.g. profile.parsing.success")],
    profile_key: Annotated[str, typer.Option(help="The profile's (or job's) key.")] = "",
    source_key: Annotated[str, typer.Option(help="Its source (or board) key.")] = "",
    url: Annotated[str, typer.Option(help="The receiver's webhook URL.")] = DEFAULT_WEBHOOK_URL,
    secret: Annotated[
        str | None,
        typer.Option(help="Default: HRFLOW_WEBHOOK_SECRET, else the secret `run` saved."),
    ] = None,
    scheme: Annotated[
        str, typer.Option(help="python-sdk | js-sdk | docs | body-hex")
    ] = "python-sdk",
    count: Annotated[int, typer.Option(min=1, help="How many distinct events.")] = 1,
    message: Annotated[
        str | None,
        typer.Option(
            help="The event's message. Default: HrFlow's, with the time sent, so each run "
            "is a new event; a fixed message sends the same bytes again (a retry)."
        ),
    ] = None,
    array: Annotated[bool, typer.Option("--array", help="All events in one delivery.")] = False,
    file: Annotated[
        Path | None, typer.Option(help="Send this JSON file's bytes, signed, as they are.")
    ] = None,
    state_dir: StateDir = runner.DEFAULT_STATE_DIR,
    allow_unknown: Annotated[
        bool, typer.Option("--allow-unknown", help="Send a type HrFlow does not document.")
    ] = False,
) -> None:
    """Sign an event the way HrFlow does and POST it; exits 1 on a non-2xx answer."""
    if file is None and not allow_unknown:
        try:
            checked_event_name(event_type)
        except UnknownEventNameError as error:
            raise fail(str(error).replace("allow_unknown=True", "--allow-unknown"), 2) from None
    if scheme not in ("python-sdk", "js-sdk", "docs", "body-hex"):
        raise fail(f"unknown --scheme {scheme!r}: python-sdk, js-sdk, docs or body-hex", 2)
    if file is None and not (profile_key and source_key):
        raise fail("pass --profile-key and --source-key (or --file)", 2)
    key = resolve_secret(secret, state_dir)
    if file is not None:
        bodies = [file.read_bytes()]
    else:
        bodies = delivery_bodies(event_type, profile_key, source_key, count, array, message)
    worst = 0
    for body in bodies:
        worst = max(worst, _post_one(url, body, key, scheme))  # type: ignore[arg-type]
    raise typer.Exit(worst)


def _post_one(url: str, body: bytes, secret: str, scheme: Scheme) -> int:
    try:
        status, answer = asyncio.run(post_signed(url, body, secret, scheme))
    except aiohttp.ClientError as error:
        raise fail(f"could not reach {url}: {error}", 2) from None
    typer.echo(f"{status} {answer}")
    return 0 if 200 <= status < 300 else 1


# --- dead letters -----------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def parse_since(value: str, now: float) -> float:
    """``2h``/``30m``/``1d``/``90s`` ago, or an ISO 8601 time (UTC when no zone): a timestamp."""
    match = _DURATION.fullmatch(value.strip())
    if match:
        return now - float(match[1]) * _UNIT_S[match[2]]
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is neither a duration (2h) nor ISO 8601") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


_KEY_FIELDS = ("key", "reference", "profile_key", "profile_reference", "job_key")


def redacted_payload(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The event with keys only: a dead letter may hold more than HrFlow's envelope."""
    shown: dict[str, Any] = {name: payload[name] for name in ("type", "origin") if name in payload}
    for obj in ("profile", "job"):
        value = payload.get(obj)
        if isinstance(value, Mapping):
            shown[obj] = _keys_of(value)
    hidden = sorted(set(payload) - set(shown) - {"message"})
    if hidden:
        shown["omitted_fields"] = hidden
    return shown


def _keys_of(obj: Mapping[str, Any]) -> dict[str, Any]:
    keys = {name: obj[name] for name in _KEY_FIELDS if name in obj}
    for parent in ("source", "board"):
        inner = obj.get(parent)
        if isinstance(inner, Mapping) and "key" in inner:
            keys[parent] = {"key": inner["key"]}
    return keys


def redacted_letter(letter: Mapping[str, Any]) -> dict[str, Any]:
    event = letter["event"]
    error = {k: v for k, v in letter["error"].items() if k != "message"}
    return {
        **{k: letter[k] for k in ("id", "handler", "reason", "tries", "received_at", "dead_at")},
        # Error messages may quote the profile (a validation error, say): type and status only.
        "error": error,
        "event": {
            "id": event["id"],
            "type": event["type"],
            "canonical_type": event["canonical_type"],
            "payload": redacted_payload(event["payload"]),
        },
    }


def _letter_row(letter: Mapping[str, Any]) -> list[str]:
    payload = letter["event"]["payload"]
    subject = payload.get("profile") or payload.get("job") or {}
    error = letter["error"]
    status = f" {error['status']}" if error.get("status") is not None else ""
    dead_at = datetime.fromtimestamp(letter["dead_at"], UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return [
        letter["id"],
        dead_at,
        letter["event"]["canonical_type"],
        letter["handler"],
        str(letter["tries"]),
        f"{error['type']}{status}",
        str(subject.get("key", "-")),
        letter["reason"],
    ]


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


LETTER_COLUMNS = ["ID", "DEAD AT", "TYPE", "HANDLER", "TRIES", "ERROR", "KEY", "REASON"]


@asynccontextmanager
async def dead_letter_store(settings: Settings) -> AsyncIterator[Any]:
    from workers.dead_letters import DeadLetters

    redis = connect_redis(settings)
    try:
        yield DeadLetters(redis, QueueKeys(settings.queue_name), settings.event_log_max_entries)
    finally:
        await redis.aclose()


@dead_letters_app.callback()
def dead_letters_options(
    ctx: typer.Context, state_dir: StateDir = runner.DEFAULT_STATE_DIR
) -> None:
    """Inspect, replay and purge dead letters."""
    ctx.obj = state_dir


def with_store(ctx: typer.Context, work: Callable[[Any], Awaitable[T]]) -> T:
    settings = service_settings(ctx.obj or runner.DEFAULT_STATE_DIR)  # dead_letters_options

    async def main() -> T:
        async with dead_letter_store(settings) as store:
            return await work(store)

    return against_redis(main())


async def _collect(store: Any, event_type: str | None, since: float | None) -> list[Any]:
    return [letter async for letter in store.iter(event_type, since)]


def _since(value: str | None) -> float | None:
    return None if value is None else parse_since(value, datetime.now(UTC).timestamp())


TypeOption = Annotated[str | None, typer.Option("--type", help="Only this event type.")]
SinceOption = Annotated[str | None, typer.Option(help="Only since: 2h, 30m, 1d, or ISO 8601.")]


@dead_letters_app.command("list")
def list_letters(
    ctx: typer.Context,
    event_type: TypeOption = None,
    since: SinceOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Dead letters, oldest first (keys only, never profile contents)."""
    letters = with_store(ctx, lambda store: _collect(store, event_type, _since(since)))
    if as_json:
        for letter in letters:
            typer.echo(orjson.dumps(redacted_letter(letter)).decode())
        return
    if not letters:
        typer.echo("no dead letters")
        return
    typer.echo(format_table(LETTER_COLUMNS, [_letter_row(letter) for letter in letters]))


@dead_letters_app.command()
def show(ctx: typer.Context, letter_id: str) -> None:
    """One dead letter as JSON (keys only)."""
    letter = with_store(ctx, lambda store: store.get(letter_id))
    if letter is None:
        raise fail(f"no dead letter {letter_id}")
    typer.echo(orjson.dumps(redacted_letter(letter), option=orjson.OPT_INDENT_2).decode())


@dead_letters_app.command()
def replay(
    ctx: typer.Context,
    letter_id: Annotated[str | None, typer.Argument()] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Every matching letter.")] = False,
    event_type: TypeOption = None,
    since: SinceOption = None,
) -> None:
    """Queue a dead letter's event again for its handler (idempotent)."""
    if (letter_id is None) == (not replay_all):
        raise fail("pass one dead-letter ID, or --all", 2)
    if letter_id is not None:
        if not with_store(ctx, lambda store: store.replay(letter_id)):
            raise fail(f"no dead letter {letter_id} (already replayed or purged?)")
        typer.echo(f"replayed {letter_id}")
        return
    replayed = with_store(ctx, lambda store: _replay_all(store, event_type, _since(since)))
    typer.echo(f"replayed {len(replayed)} dead letter(s)")
    for done_id in replayed:
        typer.echo(done_id)


async def _replay_all(store: Any, event_type: str | None, since: float | None) -> list[str]:
    letters = await _collect(store, event_type, since)
    return [letter["id"] for letter in letters if await store.replay(letter["id"])]


@dead_letters_app.command()
def purge(ctx: typer.Context, letter_id: str) -> None:
    """Delete one dead letter for good."""
    if not with_store(ctx, lambda store: store.purge(letter_id)):
        raise fail(f"no dead letter {letter_id}")
    typer.echo(f"purged {letter_id}")


# --- reconcile --------------------------------------------------------------------------------


@app.command()
def reconcile(
    source: Annotated[
        list[str], typer.Option("--source", help="A source key to scan (repeat for several).")
    ],
    since: Annotated[
        str | None,
        typer.Option(help="Scan back to: 2h, 30m, 1d, or ISO 8601 (default: the checkpoint)."),
    ] = None,
    state_dir: StateDir = runner.DEFAULT_STATE_DIR,
) -> None:
    """Queue the profile changes whose webhook never arrived, found by listing HrFlow."""
    settings, floor = service_settings(state_dir), _since(since)
    try:
        report = against_redis(_reconcile(settings, source, floor))
    except typer.Exit:
        raise
    except Exception as error:  # never a traceback: the type says enough, the text may not
        raise fail(f"reconcile failed: {type(error).__name__}") from None
    typer.echo(
        f"scanned {report.scanned} profile(s) on {report.pages} page(s): "
        f"enqueued {report.enqueued}, already handled {report.already_handled}, "
        f"already queued {report.already_queued}, no handler {report.no_handler}, "
        f"untrusted dates {report.untrusted_dates}, truncated {report.truncated}"
    )
    if report.stopped:
        raise fail(
            f"stopped early ({report.stop_reason}), an unfinished source's checkpoint is "
            f"unchanged: {report.stopped}"
        )


async def _reconcile(settings: Settings, sources: list[str], since: float | None) -> Any:
    from workers.client import client_if_configured
    from workers.plugins import build_registry
    from workers.reconcile import Reconciler

    try:  # what the workers act on decides which events are queued (workers.reconcile)
        registry = build_registry(settings)
    except Exception as error:  # a plugin's own error too: one line, as a worker says it
        raise fail(f"the handlers cannot be loaded as a worker loads them: {error}") from None
    redis = connect_redis(settings)
    try:
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=settings.api_timeout_s)
        ) as session:
            client = client_if_configured(settings, session, redis)
            if client is None:
                raise fail(
                    "reconcile lists HrFlow's profiles: set HRFLOW_API_KEY and HRFLOW_API_USER"
                )
            return await Reconciler(redis, client, settings, registry).run(sources, since, "cli")
    finally:
        await redis.aclose()


# --- erase ------------------------------------------------------------------------------------


@app.command()
def erase(
    profile_key: Annotated[
        str | None, typer.Option(help="The key of the profile to forget.")
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option(help="Its reference (an e-mail address, an ATS id), as events carry it."),
    ] = None,
    state_dir: StateDir = runner.DEFAULT_STATE_DIR,
) -> None:
    """Remove every trace of a profile from Redis and its files: jobs, dead letters, markers,
    fingerprints, its event-log entries and handled states, then the AOF is rewritten (and
    the snapshot taken again when RDB is on). Give --profile-key, --reference or both."""
    given = {"--profile-key": profile_key, "--reference": reference}
    if profile_key is None and reference is None:
        raise fail("give --profile-key, --reference or both")
    for option, value in given.items():
        if value is not None and not value.strip():
            raise fail(f"{option} is empty: it would match every profile")
    settings = service_settings(state_dir)

    async def main() -> tuple[Any, Any]:
        redis = connect_redis(settings)
        try:
            keys = QueueKeys(settings.queue_name)
            report = await erase_profile(redis, keys, profile_key, reference)
            return report, await rewrite_files(redis)
        finally:
            await redis.aclose()

    try:
        report, files = against_redis(main())
    except RebuildRefusedError as refused:
        raise fail(f"erase stopped at the event log ({refused}): run it again") from None
    typer.echo(
        f"erased {report.jobs} queued job(s), {report.dead_letters} dead letter(s), "
        f"{report.markers} marker(s), {report.fingerprints} write fingerprint(s), "
        f"{report.log_entries} event-log entries, {report.handled_states} handled state(s)"
    )
    typer.echo(files.line)
    typer.echo(NOT_REACHED)


# --- check ------------------------------------------------------------------------------------


@app.command()
def check(
    max_queue_age_s: Annotated[
        float | None,
        typer.Option(help="Oldest queued event allowed, in seconds; default from settings."),
    ] = None,
    state_dir: StateDir = runner.DEFAULT_STATE_DIR,
) -> None:
    """Exit 1, listing the problems, when Redis, the workers or the queue are unhealthy."""
    from control.health import health

    settings = service_settings(state_dir)
    age_s = settings.check_max_queue_age_s if max_queue_age_s is None else max_queue_age_s
    found = asyncio.run(health(settings, age_s))
    for problem in found.problems:
        typer.echo(f"problem: {problem}")
    for note in found.notes:
        typer.echo(f"note: {note}")
    if found.problems:
        raise typer.Exit(1)
    typer.echo("ok")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
