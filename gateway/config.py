"""Settings: the `config.toml` schema, its loading, and the one error a bad config raises.

Settings are read once (TOML, then `GATEWAY_<SECTION>__<KEY>` environment overrides) and passed
down by constructor; nothing reads them from a module global.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gateway.errors import ConfigError
from gateway.rules.model import (
    SETTING_ERROR,
    FolderSettings,
    RuleSettings,
    WebhookSettings,
    setting_error,
)

__all__ = [
    "ControlSettings",
    "DispatchSettings",
    "FolderSettings",
    "LogSettings",
    "MetricsSettings",
    "NodeSettings",
    "PeerSettings",
    "ProjectSettings",
    "RetentionSettings",
    "RetrieveSettings",
    "RuleSettings",
    "SecuritySettings",
    "Settings",
    "WebhookSettings",
    "WindowSettings",
    "load_settings",
]

_AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII less backslash


def _check_ae_title(value: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_TITLE_RE.match(value):
        raise ValueError("an AE title is 1 to 16 printable ASCII characters, not all spaces")
    return stripped


AETitle = Annotated[str, AfterValidator(_check_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSettings(_Section):
    """The DICOM node: who it is, where it listens, where it keeps data."""

    ae_title: AETitle = "GATEWAY"
    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=0, le=65535)] = 11112
    data_dir: Path = Path("./data")
    max_associations: Annotated[int, Field(ge=1, le=1024)] = 32
    max_pdu_size: Annotated[int, Field(ge=4096, le=64 * 1024 * 1024)] = 262144
    acse_timeout: Seconds = 30.0
    dimse_timeout: Seconds = 60.0
    network_timeout: Seconds = 60.0
    connection_timeout: Seconds = 10.0
    # An association the node opened stays open this long after its last use, for the next
    # job or query to the same peer (as Orthanc's DicomAssociationCloseDelay); 0: released at
    # once.
    association_close_delay: Annotated[float, Field(ge=0, le=600)] = 5.0
    shutdown_grace: Annotated[float, Field(ge=0)] = 30.0
    duplicate_policy: Literal["keep_first", "overwrite", "reject"] = "keep_first"
    accept_unknown_sop_classes: bool = False
    check_called_ae: bool = True
    min_free_mb: Annotated[int, Field(ge=0)] = 1024
    max_find_results: Annotated[int, Field(ge=0)] = 1000
    # Bytes of one received dataset (as received, File Meta excluded): a C-STORE whose dataset
    # grows past it is refused 0xA700 and nothing of it is kept. 4 GiB by default.
    max_instance_bytes: Annotated[int, Field(ge=1)] = 4 * 1024**3
    # DICOM TLS (PS3.15 B.1; BCP 195): a second listener that speaks only TLS. The node's
    # certificate is also its client certificate towards `tls = true` peers; tls_ca holds the
    # certificates trusted for client certificates and for peers.
    tls_port: Annotated[int | None, Field(ge=0, le=65535)] = None
    plain: bool = True  # False: no plain DICOM listener (tls_port only)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_require_client_cert: bool | None = None  # None: required when tls_ca is set

    @model_validator(mode="after")
    def _tls(self) -> NodeSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise setting_error("tls_cert and tls_key go together", "tls_key")
        if self.tls_port is not None and self.tls_cert is None:
            raise setting_error("a TLS listener (tls_port) needs tls_cert and tls_key", "tls_cert")
        if not self.plain and self.tls_port is None:
            raise setting_error("plain = false leaves no listener: set tls_port", "plain")
        if self.tls_require_client_cert and self.tls_ca is None:
            raise setting_error(
                "client certificates are verified against tls_ca: set it", "tls_require_client_cert"
            )
        return self

    @property
    def requires_client_cert(self) -> bool:
        """Whether the TLS listener refuses a client without a certificate tls_ca verifies."""
        if self.tls_require_client_cert is None:
            return self.tls_ca is not None
        return self.tls_require_client_cert


class DispatchSettings(_Section):
    """How jobs are run: concurrency per target, retries with exponential backoff and jitter."""

    per_target_concurrency: Annotated[int, Field(ge=1, le=64)] = 2
    retry_base_seconds: Annotated[float, Field(ge=0)] = 5.0
    retry_max_seconds: Annotated[float, Field(ge=0)] = 600.0
    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 10
    # A running job whose worker acknowledges nothing for this long is claimed again (another
    # attempt), without a restart: longer than one instance takes to send.
    lease_seconds: Seconds = 300.0


_SYSLOG_RE = re.compile(r"^(udp)://([^/:\s]+|\[[0-9a-fA-F:]+\]):([0-9]{1,5})$")


class AuditSettings(_Section):
    """The audit trail (docs/audit.md): always written under data_dir/audit/; optionally also
    sent to a syslog collector as RFC 5424 messages over UDP (RFC 5426, `udp://host:514`): a
    datagram never waits for the collector, so a collector that is down delays nothing."""

    syslog: str | None = None

    @field_validator("syslog")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and not _SYSLOG_RE.match(value):
            raise setting_error(f"{value!r} is not udp://host:port")
        return value

    def syslog_address(self) -> tuple[str, str, int] | None:
        """(transport, host, port) of the collector, or None."""
        match = _SYSLOG_RE.match(self.syslog or "")
        if match is None:
            return None
        return match.group(1), match.group(2).strip("[]"), int(match.group(3))


class RetentionSettings(_Section):
    """When studies leave the store: after their jobs are done, once they are old enough."""

    delete_after_days: Annotated[float, Field(ge=0)] = 0.0
    check_seconds: Seconds = 300.0


class CallerSettings(_Section):
    """One allowed calling AE, optionally bound to a host address."""

    ae_title: AETitle
    host: str | None = None


# The DICOM services a caller may use (`[[peers]] services`, `[security] default_services`):
# C-ECHO, C-STORE, C-FIND (Q/R), C-MOVE, C-GET, Modality Worklist C-FIND, MPPS N-CREATE/N-SET.
Service = Literal["echo", "store", "find", "move", "get", "worklist", "mpps"]
SERVICES: tuple[Service, ...] = ("echo", "store", "find", "move", "get", "worklist", "mpps")
# What a caller that is neither a peer nor a device's station may use, by default.
_UNKNOWN_CALLERS: tuple[Service, ...] = ("echo", "store")
# What the station AE title of a registered device may use.
DEVICE_SERVICES: tuple[Service, ...] = ("echo", "store", "worklist", "mpps")


class SecuritySettings(_Section):
    """Who may associate (an empty allowlist admits every calling AE), and what a caller that
    is neither a peer nor a registered device's station may use."""

    allowed_callers: list[CallerSettings] = Field(default_factory=list)
    default_services: list[Service] = Field(default_factory=lambda: list(_UNKNOWN_CALLERS))


class PeerSettings(_Section):
    """A remote DICOM node the gateway may connect to (move destination, target, archive)."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    ae_title: AETitle
    host: str
    port: Port
    # As an archive that retrieval queries and retrieves from:
    retrieve: Literal["move", "get"] = "move"
    queries_per_minute: Annotated[float, Field(ge=0)] = 0.0
    moves_per_minute: Annotated[float, Field(ge=0)] = 0.0
    max_concurrent_moves: Annotated[int, Field(ge=1, le=64)] = 2
    # As a caller: the services it may use (None: all of them).
    services: list[Service] | None = None
    # Reached over DICOM TLS, its certificate verified against [node] tls_ca; host names are
    # checked only when asked (DICOM peers are often addressed by IP).
    tls: bool = False
    tls_check_hostname: bool = False
    # As a destination: False sends stored transfer syntaxes only (no re-encoding, no
    # decompression); an instance the peer takes in none of them fails with `no_context`.
    transcode: bool = True


Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
DAYS: tuple[Day, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_CLOCK_RE = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$|^24:00$")


class WindowSettings(_Section):
    """When the secondary archive may be used: on *days*, from *start* to *end* (local time).

    An *end* at or before *start* runs past midnight into the next day ("19:00" to "07:00").
    """

    days: list[Day] = Field(default_factory=lambda: list(DAYS))
    start: str = "00:00"
    end: str = "24:00"

    @field_validator("start", "end")
    @classmethod
    def _clock(cls, value: str) -> str:
        if not _CLOCK_RE.match(value):
            raise setting_error(f"{value!r} is not a time of day as HH:MM (00:00 to 24:00)")
        return value

    def minutes(self) -> tuple[int, int]:
        """Start and end as minutes after midnight."""
        start_h, start_m = self.start.split(":")
        end_h, end_m = self.end.split(":")
        return int(start_h) * 60 + int(start_m), int(end_h) * 60 + int(end_m)


class ProjectSettings(_Section):
    """A project retrieval requests may name, and where its studies go."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    anonymiser: str | None = None


class RetrieveSettings(_Section):
    """Cohort retrieval: the archives, the anonymiser, and how requests are worked."""

    primary: str | None = None
    secondary: str | None = None
    anonymiser: str | None = None
    timezone: str = "UTC"
    secondary_windows: list[WindowSettings] = Field(default_factory=list)
    concurrency: Annotated[int, Field(ge=1, le=64)] = 4
    stall_seconds: Seconds = 300.0
    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 5
    retry_base_seconds: Annotated[float, Field(ge=0)] = 10.0
    retry_max_seconds: Annotated[float, Field(ge=0)] = 600.0
    # A request being worked whose worker reports nothing (no step, no progress, no wait it
    # chose) for this long is claimed again (another attempt), without a restart.
    lease_seconds: Seconds = 300.0

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            message = f"unknown time zone {value!r} (an IANA name such as Europe/London)"
            raise setting_error(message) from None
        return value

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class ControlSettings(_Section):
    """The JSON-RPC control socket."""

    socket: Path | None = None
    max_line_bytes: Annotated[int, Field(ge=1024, le=256 * 1024 * 1024)] = 1024 * 1024
    max_clients: Annotated[int, Field(ge=1, le=10000)] = 64
    idle_timeout: Seconds = 600.0
    # The TCP listener for devices and remote operators (off unless tcp_port is set).
    tcp_host: str = "127.0.0.1"
    tcp_port: Annotated[int | None, Field(ge=0, le=65535)] = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    operator_token_hashes: list[str] = Field(default_factory=list)
    device_heartbeat_timeout: Seconds = 60.0
    upload_idle_timeout: Seconds = 600.0  # an upload with no chunk this long is dropped

    @field_validator("operator_token_hashes")
    @classmethod
    def _hashes(cls, value: list[str]) -> list[str]:
        for item in value:
            parts = item.split("$")
            if (
                len(parts) != 3
                or parts[0] != "sha256"
                or not all(re.fullmatch(r"[0-9a-f]+", p) for p in parts[1:])
            ):
                message = (
                    f"{item[:20]!r}... is not a token hash: make one with `gateway control"
                    " hash-token` (sha256$<salt hex>$<digest hex>)"
                )
                raise setting_error(message)
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> ControlSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise setting_error("tls_cert and tls_key go together", "tls_key")
        if self.tcp_port is not None and self.tls_cert is None and not _loopback(self.tcp_host):
            raise setting_error(
                f"{self.tcp_host!r} is not a loopback address: a TCP control listener"
                " reachable from the network needs tls_cert and tls_key (tokens would cross"
                " it in clear)",
                "tcp_host",
            )
        return self


def _loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class MetricsSettings(_Section):
    """The Prometheus endpoint (off unless port is set): /metrics and /healthz over HTTP. It
    serves counts and states, never patient data, so it may listen beyond loopback."""

    host: Annotated[str, Field(min_length=1)] = "127.0.0.1"
    port: Annotated[int | None, Field(ge=0, le=65535)] = None


class LogSettings(_Section):
    """structlog output: console in a terminal, JSON in production."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "console", "json"] = "auto"
    # Where log lines go; the container image sets stdout (GATEWAY_LOG__STREAM).
    stream: Literal["stderr", "stdout"] = "stderr"


class Settings(BaseSettings):
    """The whole `config.toml`."""

    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    node: NodeSettings = Field(default_factory=NodeSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    peers: list[PeerSettings] = Field(default_factory=list)
    folders: list[FolderSettings] = Field(default_factory=list)
    webhooks: list[WebhookSettings] = Field(default_factory=list)
    rules: list[RuleSettings] = Field(default_factory=list)
    dispatch: DispatchSettings = Field(default_factory=DispatchSettings)
    retrieve: RetrieveSettings = Field(default_factory=RetrieveSettings)
    projects: list[ProjectSettings] = Field(default_factory=list)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    control: ControlSettings = Field(default_factory=ControlSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    log: LogSettings = Field(default_factory=LogSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs; the environment overrides it.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _check_names(self) -> Settings:
        """Peer and folder names unique together, rule names unique, targets that exist."""
        kinds: dict[str, str] = {}
        for index, peer in enumerate(self.peers):
            if peer.tls and self.node.tls_ca is None:
                raise setting_error(
                    f"peer {peer.name!r} is reached over TLS: its certificate is verified"
                    " against [node] tls_ca, which is not set",
                    f"peers.{index}.tls",
                )
            if peer.name in kinds:
                raise setting_error(f"peer name {peer.name!r} is used twice", f"peers.{index}.name")
            kinds[peer.name] = "peer"
        for index, folder in enumerate(self.folders):
            if folder.name in kinds:
                message = (
                    f"folder name {folder.name!r} is already the name of a {kinds[folder.name]}"
                )
                raise setting_error(message, f"folders.{index}.name")
            kinds[folder.name] = "folder"
        for index, hook in enumerate(self.webhooks):
            if hook.name in kinds:
                message = f"webhook name {hook.name!r} is already the name of a {kinds[hook.name]}"
                raise setting_error(message, f"webhooks.{index}.name")
            kinds[hook.name] = "webhook"
        rules: set[str] = set()
        for index, rule in enumerate(self.rules):
            if rule.name in rules:
                raise setting_error(f"rule name {rule.name!r} is used twice", f"rules.{index}.name")
            rules.add(rule.name)
            wanted = ("webhook",) if rule.action == "notify" else ("peer", "folder")
            tables = "[[webhooks]]" if rule.action == "notify" else "[[peers]] or [[folders]]"
            for target in rule.targets:
                if kinds.get(target) not in wanted:
                    names = [name for name, kind in kinds.items() if kind in wanted]
                    known = ", ".join(names) or "none configured"
                    message = (
                        f"rule {rule.name!r}: unknown target {target!r}: not the name of a"
                        f" {tables} entry (known: {known})"
                    )
                    raise setting_error(message, f"rules.{index}.targets")
        self._check_retrieval(kinds)
        return self

    def _check_retrieval(self, kinds: dict[str, str]) -> None:
        peers = [name for name, kind in kinds.items() if kind == "peer"]
        known = ", ".join(peers) or "none configured"
        for key in ("primary", "secondary", "anonymiser"):
            name = getattr(self.retrieve, key)
            if name is not None and kinds.get(name) != "peer":
                message = f"{name!r} is not the name of a [[peers]] entry (known: {known})"
                raise setting_error(message, f"retrieve.{key}")
        if self.retrieve.secondary is not None and self.retrieve.primary is None:
            raise setting_error("a secondary archive needs a primary one", "retrieve.secondary")
        names: set[str] = set()
        for index, project in enumerate(self.projects):
            if project.name in names:
                message = f"project name {project.name!r} is used twice"
                raise setting_error(message, f"projects.{index}.name")
            names.add(project.name)
            if project.anonymiser is not None and kinds.get(project.anonymiser) != "peer":
                message = (
                    f"{project.anonymiser!r} is not the name of a [[peers]] entry (known: {known})"
                )
                raise setting_error(message, f"projects.{index}.anonymiser")

    def project(self, name: str) -> ProjectSettings | None:
        """The `[[projects]]` entry called *name*, if any."""
        return next((p for p in self.projects if p.name == name), None)

    @property
    def control_socket(self) -> Path:
        """Where the control socket lives: `[control] socket`, else inside `data_dir`."""
        return self.control.socket or self.node.data_dir / "control.sock"

    def peer(self, name: str) -> PeerSettings | None:
        """The `[[peers]]` entry called *name*, if any."""
        return next((p for p in self.peers if p.name == name), None)

    def peer_by_ae_title(self, ae_title: str) -> PeerSettings | None:
        """The `[[peers]]` entry whose AE title is *ae_title*, if any."""
        return next((p for p in self.peers if p.ae_title == ae_title.strip()), None)

    def folder(self, name: str) -> FolderSettings | None:
        """The `[[folders]]` entry called *name*, if any."""
        return next((f for f in self.folders if f.name == name), None)

    def webhook(self, name: str) -> WebhookSettings | None:
        """The `[[webhooks]]` entry called *name*, if any."""
        return next((w for w in self.webhooks if w.name == name), None)


def _describe(error: dict[str, Any]) -> str:
    parts = [str(part) for part in error["loc"]]
    if error["type"] == SETTING_ERROR:
        # Our own checks: the message is complete, and a model-level one names its key.
        context = error.get("ctx") or {}
        if context.get("key"):
            parts.append(str(context["key"]))
        location = ".".join(parts) or "(top level)"
        return f"{location}: {_one_line(str(context.get('message', error['msg'])))}"
    location = ".".join(parts) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{location}: unknown key"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] not in ("missing",) and "input" in error:
        return f"{location}: {message} (got {error['input']!r})"
    return f"{location}: {message}"


def _one_line(text: str) -> str:
    """A message that quotes config text (an expression over several lines) kept on one line."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _environment_variable(loc: tuple[int | str, ...]) -> str | None:
    """The GATEWAY_SECTION__KEY (or GATEWAY_SECTION) variable that set the value at *loc*,
    if one is set."""
    names = [f"GATEWAY_{loc[0]}".upper()] if loc else []
    if len(loc) > 1:
        names.insert(0, f"GATEWAY_{loc[0]}__{loc[1]}".upper())
    for name in names:
        for variable in os.environ:
            if variable.upper() == name:
                return variable
    return None


def load_settings(path: Path | str) -> Settings:
    """Read *path* as TOML and the environment as overrides.

    Raises
    ------
    ConfigError
        With one message naming the file, the key and what is wrong with it.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        in_file: list[str] = []
        parts: list[str] = []
        for err in exc.errors():
            variable = _environment_variable(err["loc"])
            if variable is None:
                in_file.append(_describe(dict(err)))
            else:  # an override from the environment: the file has nothing to fix
                parts.append(f"environment variable {variable}: {_describe(dict(err))}")
        if in_file:
            parts.insert(0, f"{path}: " + "; ".join(in_file))
        raise ConfigError("; ".join(parts)) from None
    if not settings.node.data_dir.is_absolute():
        # Relative data paths are relative to the config file, not to the working directory.
        node = settings.node.model_copy(update={"data_dir": path.parent / settings.node.data_dir})
        settings = settings.model_copy(update={"node": node})
    for section, keys in (
        ("control", ("socket", "tls_cert", "tls_key")),
        ("node", ("tls_cert", "tls_key", "tls_ca")),
    ):
        current = getattr(settings, section)
        relative = {
            key: path.parent / value
            for key in keys
            if (value := getattr(current, key)) is not None and not value.is_absolute()
        }
        if relative:
            settings = settings.model_copy(update={section: current.model_copy(update=relative)})
        for key in keys:
            file = getattr(getattr(settings, section), key)
            if key != "socket" and file is not None and not file.is_file():
                raise ConfigError(f"{path}: {section}.{key}: {file} is not a readable file")
    if any(not folder.path.is_absolute() for folder in settings.folders):
        folders = [
            folder
            if folder.path.is_absolute()
            else folder.model_copy(update={"path": path.parent / folder.path})
            for folder in settings.folders
        ]
        settings = settings.model_copy(update={"folders": folders})
    for index, folder in enumerate(settings.folders):
        if folder.path.exists() and not folder.path.is_dir():
            raise ConfigError(f"{path}: folders.{index}.path: {folder.path} is not a directory")
    return settings
