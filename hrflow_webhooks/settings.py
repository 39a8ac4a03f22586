"""One settings object, read from the environment once, at start-up.

Every knob of the service is a field here and a row of README's configuration
table. Nothing deeper in the code reads ``os.environ``: the receiver, the
workers and the CLI each build a ``Settings`` at their edge and pass it down.
"""

from __future__ import annotations

import urllib.parse
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from hrflow_webhooks.queue import EVENT_LOG_MAX_ENTRIES

SignatureScheme = Literal["auto", "python-sdk", "js-sdk", "docs", "body-hex"]
# What a 202 relies on (hrflow_webhooks.durability): the AOF on one Redis, writes copied to
# replicas before the answer, the provider's own guarantee (which cannot be checked), or
# nothing (loss accepted).
Durability = Literal["fsync", "replicas", "managed", "none"]


class MissingSecretError(RuntimeError):
    """The receiver cannot start without a webhook secret."""

    @classmethod
    def for_receiver(cls) -> MissingSecretError:
        return cls(
            "HRFLOW_WEBHOOK_SECRET is not set: the receiver refuses to start without it "
            "(comma-separate several secrets to rotate: HRFLOW_WEBHOOK_SECRET=new,old)"
        )


def _split_items(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _split_csv(value: object) -> object:
    return _split_items(value) if isinstance(value, str) else value


def _parse_tags(value: object) -> object:
    """``name=value,name2=value2`` → ``{"name": "value", "name2": "value2"}``."""
    if not isinstance(value, str):
        return value
    tags: dict[str, str] = {}
    for item in _split_items(value):
        name, sep, tag_value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"HRFLOW_EDIT_TAGS item {item!r} is not name=value")
        tags[name.strip()] = tag_value.strip()
    return tags


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="HRFLOW_", case_sensitive=False, extra="ignore", frozen=True
    )

    # --- receiver -----------------------------------------------------------------------------
    webhook_secrets: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        validation_alias=AliasChoices("HRFLOW_WEBHOOK_SECRET", "webhook_secrets"),
    )
    signature_scheme: SignatureScheme = "auto"
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    # Unset: room for the signature header of a max_body_bytes payload (receiver.protocol).
    max_header_bytes: int | None = Field(default=None, ge=4096)
    keep_alive_timeout_s: float = Field(default=5.0, gt=0)
    head_timeout_s: float = Field(default=30.0, gt=0)
    body_timeout_s: float = Field(default=60.0, gt=0)
    # Unset: the process's open-file limit less a headroom (receiver.protocol).
    max_connections: int | None = Field(default=None, ge=1)
    dedup_window_s: int = Field(default=86_400, ge=1)

    # --- Redis and the queue ------------------------------------------------------------------
    redis_url: str = Field(
        default="redis://localhost:6379/0",
        validation_alias=AliasChoices("REDIS_URL", "HRFLOW_REDIS_URL", "redis_url"),
    )
    # Set: the primary is found through these Sentinels (host:port, comma-separated), and
    # REDIS_URL gives only the database, user, password and TLS (hrflow_webhooks.redis_setup).
    redis_sentinels: Annotated[list[str], NoDecode] = Field(default_factory=list)
    redis_sentinel_master: str | None = None
    redis_sentinel_password: SecretStr | None = None
    queue_name: str = "hrflow:queue"
    redis_timeout_s: float = Field(default=2.0, gt=0)
    redis_durability: Durability = "fsync"
    # The weakest AOF fsync policy `fsync` durability accepts; `none` is the older spelling of
    # HRFLOW_REDIS_DURABILITY=none (see `durability`).
    redis_fsync: Literal["always", "everysec", "none"] = "everysec"
    # Replicas that must hold a batch of deliveries before they are answered 202 (WAIT).
    redis_min_replicas_ack: int = Field(default=0, ge=0)
    redis_replica_ack_timeout_ms: int = Field(default=500, ge=1)
    redis_memory_high_water: float = Field(default=0.9, gt=0, le=1)
    durability_check_interval_s: float = Field(default=5.0, gt=0)

    # --- workers ------------------------------------------------------------------------------
    handlers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    worker_max_jobs: int = Field(default=100, ge=1)
    worker_poll_delay_s: float = Field(default=0.01, gt=0)
    job_timeout_s: int = Field(default=20, ge=2)
    max_tries: int = Field(default=8, ge=1)
    retry_base_s: float = Field(default=1.0, gt=0)
    retry_max_s: float = Field(default=300.0, gt=0)
    shutdown_grace_s: int = Field(default=25, ge=0)
    not_found_grace_s: float = Field(default=300.0, ge=0)
    health_check_interval_s: int = Field(default=10, ge=1)
    # A claimed run is held while its worker renews this lease (workers.leases).
    worker_lease_s: float = Field(default=5.0, ge=1)

    # --- HrFlow API ---------------------------------------------------------------------------
    api_url: str = "https://api.hrflow.ai/v1"
    api_key: SecretStr | None = None
    api_user: str | None = None
    api_timeout_s: float = Field(default=10.0, gt=0)
    api_rate_per_s: float | None = Field(default=None, gt=0)

    # --- built-in handlers --------------------------------------------------------------------
    index_source_key: str | None = None
    index_from_sources: Annotated[list[str], NoDecode] = Field(default_factory=list)
    edit_tags: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    edit_sources: Annotated[list[str], NoDecode] = Field(default_factory=list)
    require_consent: bool = False
    write_echo_ttl_s: int = Field(default=3_600, ge=1)

    # --- the event log and reconciliation --------------------------------------------------
    event_log_retention_s: int = Field(default=604_800, ge=60)
    event_log_max_entries: int = Field(default=EVENT_LOG_MAX_ENTRIES, ge=1_000)
    reconcile_sources: Annotated[list[str], NoDecode] = Field(default_factory=list)
    reconcile_interval_s: float = Field(default=900.0, ge=10)
    # One run's bounds (workers.reconcile): whichever comes first ends it, with a report.
    reconcile_page_size: int = Field(default=100, ge=1, le=1_000)
    reconcile_max_pages: int = Field(default=200, ge=1)
    reconcile_max_enqueued: int = Field(default=10_000, ge=1)
    reconcile_max_duration_s: float = Field(default=300.0, gt=0)

    # --- operations ---------------------------------------------------------------------------
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    worker_metrics_port: int | None = Field(default=None, ge=0, le=65535)
    receiver_metrics_port: int | None = Field(default=None, ge=0, le=65535)
    # Where the metrics servers listen: loopback unless a scraper elsewhere needs them.
    metrics_host: str = "127.0.0.1"
    # Set: the receiver also serves /metrics on the webhook port, to this bearer token only.
    metrics_token: SecretStr | None = None
    check_max_queue_age_s: float = Field(default=300.0, gt=0)  # `check` fails past this
    # `check`, /readyz?strict and the console fail past this: a run (and its profile's later
    # changes behind it) waiting since it first became due, retries and parking included.
    # Above the default retry schedule's worst case (7 waits of at most HRFLOW_RETRY_MAX_S).
    max_run_wait_s: float = Field(default=2_400.0, gt=0)

    # --- the operator console (control/console) ----------------------------------------------
    # Its own interface and port, never the public webhook port. Loopback by default: the
    # console refuses any other interface without a token.
    console_host: str = "127.0.0.1"
    console_port: int = Field(default=8100, ge=0, le=65535)
    console_token: SecretStr | None = None
    # Where operators open the console when a proxy stands in front (https://ops.example.com):
    # the only origin its forms are accepted from, and https makes its cookie Secure.
    console_origin: str | None = None

    @field_validator(
        "webhook_secrets",
        "handlers",
        "index_from_sources",
        "edit_sources",
        "reconcile_sources",
        "redis_sentinels",
        mode="before",
    )
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("edit_tags", mode="before")
    @classmethod
    def _tags(cls, value: object) -> object:
        return _parse_tags(value)

    @field_validator("console_origin")
    @classmethod
    def _origin(cls, value: str | None) -> str | None:
        if not value:
            return None
        parsed = urllib.parse.urlsplit(value.strip())
        if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.path.strip("/"):
            raise ValueError(
                "HRFLOW_CONSOLE_ORIGIN must be a scheme and a host, as a browser shows it "
                "(https://console.example.com, or with :port), with no path"
            )
        return f"{parsed.scheme}://{parsed.netloc.lower()}"

    @model_validator(mode="after")
    def _redis_choices_agree(self) -> Settings:
        if self.redis_sentinels and not self.redis_sentinel_master:
            raise ValueError(
                "HRFLOW_REDIS_SENTINELS is set but HRFLOW_REDIS_SENTINEL_MASTER is not: "
                "name the primary the Sentinels watch (their `sentinel monitor <name>`)"
            )
        if self.durability == "replicas" and self.redis_min_replicas_ack < 1:
            raise ValueError(
                "HRFLOW_REDIS_DURABILITY=replicas needs HRFLOW_REDIS_MIN_REPLICAS_ACK of 1 or "
                "more: how many replicas must hold a delivery before it is answered 202"
            )
        return self

    @property
    def durability(self) -> Durability:
        """What acknowledged events rely on; ``HRFLOW_REDIS_FSYNC=none`` still means none."""
        return "none" if self.redis_fsync == "none" else self.redis_durability

    def secret_bytes(self) -> tuple[bytes, ...]:
        """The webhook secrets as bytes, newest first; raises when none is set."""
        if not self.webhook_secrets:
            raise MissingSecretError.for_receiver()
        return tuple(s.get_secret_value().encode() for s in self.webhook_secrets)
