"""TOML configuration -> typed, validated settings.

Every error names the key (``model.device``) and says what would be accepted, because the
person reading it is an administrator editing a file, not a developer reading a traceback.
Unknown keys are errors too: a misspelt key silently ignored is a setting silently lost.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from screener.backfill import Limits, parse_quiet_hours
from screener.node.aetitle import validate_ae_title
from screener.node.dispatch import DispatchSettings
from screener.node.receive import ReceiveSettings
from screener.pipeline.decode import DecodeLimits
from screener.pipeline.eligibility import EligibilityRules
from screener.supervise import default_processes

__all__ = [
    "BackfillConfig",
    "ConfigError",
    "DecodeSettings",
    "DestinationConfig",
    "DispatchConfig",
    "NodeSettings",
    "StorageSettings",
    "WorkerSettings",
    "EligibilitySettings",
    "ModelSettings",
    "Settings",
    "build_decode_limits",
    "build_eligibility_rules",
    "load_config",
    "parse_config",
]

# The pipeline's own dataclasses hold the defaults, so the file, the example and the code
# cannot drift apart; the settings classes add only what a TOML file needs (key names in
# errors, lists instead of tuples).
_RULES = EligibilityRules()
_LIMITS = DecodeLimits()


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and the fix."""


#: model.precision values: the members of pipeline.estimate.Precision (a test holds them equal;
#: the config does not import torch to check a word).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class ModelSettings:
    bundle: str = ""  # empty: the demo bundle shipped in the package
    device: str = "auto"  # cpu, cuda, cuda:N or auto
    batch_size: int = 8
    precision: str = "auto"  # of the BMD network: auto, fp32, bf16, fp16 (pipeline.estimate.Precision)
    channels_last: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"model.precision = {self.precision!r}: use one of {', '.join(PRECISIONS)} "
                              "(auto: bf16 or fp16 on a GPU, fp32 on the CPU)")
        if not (self.device in ("cpu", "auto", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"model.device = {self.device!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'")
        if not 1 <= self.batch_size <= 256:
            raise ConfigError(f"model.batch_size = {self.batch_size}: use a whole number from 1 to 256")
        if self.bundle and not (Path(self.bundle) / "manifest.json").is_file():
            raise ConfigError(f"model.bundle = {self.bundle!r}: no manifest.json there; give a bundle directory or leave it empty for the demo bundle")


def _pipeline_error(section: str, prefix: str, exc: ValueError) -> ConfigError:
    """The pipeline names its fields ``EligibilityRules.min_age``; a file has ``eligibility.min_age``."""
    return ConfigError(str(exc).replace(prefix, f"{section}."))


@dataclass(frozen=True)
class DecodeSettings:
    """[decode]: size limits checked from the header before any pixel data is decoded."""

    min_side: int = _LIMITS.min_side
    max_side: int = _LIMITS.max_side
    max_pixels: int = _LIMITS.max_pixels

    def __post_init__(self) -> None:
        if self.max_side > 65535:
            raise ConfigError(f"decode.max_side = {self.max_side}: Rows and Columns cannot exceed 65535; use a smaller number")
        try:
            build_decode_limits(self)
        except ValueError as exc:
            raise _pipeline_error("decode", "DecodeLimits.", exc) from exc


@dataclass(frozen=True)
class EligibilitySettings:
    """[eligibility]: which images are screened (see screener.pipeline.eligibility for why)."""

    sop_classes: tuple[str, ...] = _RULES.sop_classes
    accept_secondary_capture: bool = _RULES.accept_secondary_capture
    modalities: tuple[str, ...] = _RULES.modalities
    body_parts: tuple[str, ...] = _RULES.body_parts
    missing_body_part: str = _RULES.missing_body_part
    views: tuple[str, ...] = _RULES.views
    missing_view: str = _RULES.missing_view
    accept_derived_primary: bool = _RULES.accept_derived_primary
    min_age: float = _RULES.min_age
    missing_age: str = _RULES.missing_age
    min_landmark_confidence: float = _RULES.min_landmark_confidence
    max_turned_confidence_ratio: float = _RULES.max_turned_confidence_ratio
    min_roi_landmark_confidence: float = _RULES.min_roi_landmark_confidence
    min_thorax_width: float = _RULES.min_thorax_width
    max_thorax_width: float = _RULES.max_thorax_width
    min_thorax_aspect: float = _RULES.min_thorax_aspect
    max_thorax_aspect: float = _RULES.max_thorax_aspect
    max_spine_tilt_deg: float = _RULES.max_spine_tilt_deg
    min_roi_inside: float = _RULES.min_roi_inside
    inverted_margin: float = _RULES.inverted_margin
    min_heart_side_contrast: float = _RULES.min_heart_side_contrast
    min_heart_side_contrast_with_view: float = _RULES.min_heart_side_contrast_with_view
    min_mediastinum_contrast: float = _RULES.min_mediastinum_contrast
    min_view_frontal_probability: float = _RULES.min_view_frontal_probability

    def __post_init__(self) -> None:
        for uid in self.sop_classes:
            parts = uid.split(".")
            if len(uid) > 64 or not all(part.isdigit() and (part == "0" or not part.startswith("0")) for part in parts):
                raise ConfigError(f"eligibility.sop_classes: {uid!r} is not a DICOM UID (digits and dots, e.g. '1.2.840.10008.5.1.4.1.1.1')")
        try:
            build_eligibility_rules(self)
        except ValueError as exc:
            raise _pipeline_error("eligibility", "EligibilityRules.", exc) from exc


def _positive(key: str, value: float, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{key} = {value}: use a number {'>= 0' if zero_ok else '> 0'}")


def _default(cls: type, name: str) -> Any:
    """A field's default in the dataclass that owns the rule (one source for every default)."""
    return {f.name: f.default for f in fields(cls)}[name]


_MIB = 1024 * 1024


@dataclass(frozen=True)
class NodeSettings:
    """[node]: the DICOM C-STORE SCP (see screener.node.receive.ReceiveSettings)."""

    ae_title: str = _default(ReceiveSettings, "ae_title")
    bind_address: str = _default(ReceiveSettings, "bind_address")
    port: int = _default(ReceiveSettings, "port")
    allowed_calling_aes: tuple[str, ...] = _default(ReceiveSettings, "allowed_calling_aes")
    allowed_peers: tuple[str, ...] = _default(ReceiveSettings, "allowed_peers")
    max_dataset_bytes: int = _default(ReceiveSettings, "max_dataset_bytes")
    min_free_mb: int = _default(ReceiveSettings, "min_free_bytes") // _MIB
    acse_timeout_s: float = _default(ReceiveSettings, "acse_timeout_s")
    network_timeout_s: float = _default(ReceiveSettings, "network_timeout_s")
    max_associations: int = _default(ReceiveSettings, "max_associations")
    max_associations_per_peer: int = _default(ReceiveSettings, "max_associations_per_peer")
    tls_port: int = _default(ReceiveSettings, "tls_port")
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    plain: bool = _default(ReceiveSettings, "plain")
    receive_processes: int = 2
    health_port: int = 0
    health_bind_address: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if isinstance(self.health_port, bool) or not isinstance(self.health_port, int) or not 0 <= self.health_port <= 65535:
            raise ConfigError(f"node.health_port = {self.health_port!r}: use a TCP port 1-65535, or 0 for no "
                              "HTTP health endpoint")
        try:
            ipaddress.ip_address(self.health_bind_address)
        except ValueError:
            raise ConfigError(f"node.health_bind_address = {self.health_bind_address!r}: use an IP address, "
                              "e.g. \"127.0.0.1\" (loopback) or \"0.0.0.0\"") from None

        if not isinstance(self.receive_processes, int) or not 1 <= self.receive_processes <= 64:
            raise ConfigError(f"node.receive_processes = {self.receive_processes!r}: use an integer from 1 to 64 "
                              "(about one per CPU core; 1 receives in the main process only)")
        _positive("node.min_free_mb", self.min_free_mb, zero_ok=True)
        try:  # the receive layer owns these rules; only the key names change
            self.receive_settings(spool_root=Path("."), model_id="x", patient_salt=b"x")
        except ValueError as exc:
            raise ConfigError(f"node.{exc}") from exc

    def receive_settings(self, *, spool_root: Path, model_id: str, patient_salt: bytes) -> ReceiveSettings:
        """The receive layer's settings from these keys (the rest come from the service)."""
        return ReceiveSettings(
            spool_root=spool_root, model_id=model_id, patient_salt=patient_salt, port=self.port,
            ae_title=self.ae_title, bind_address=self.bind_address, allowed_calling_aes=self.allowed_calling_aes,
            allowed_peers=self.allowed_peers, max_dataset_bytes=self.max_dataset_bytes,
            min_free_bytes=self.min_free_mb * _MIB, acse_timeout_s=self.acse_timeout_s,
            network_timeout_s=self.network_timeout_s, max_associations=self.max_associations,
            max_associations_per_peer=self.max_associations_per_peer, tls_port=self.tls_port,
            tls_cert_file=self.tls_cert_file, tls_key_file=self.tls_key_file, tls_ca_file=self.tls_ca_file,
            plain=self.plain)


@dataclass(frozen=True)
class StorageSettings:
    """[storage]: where the database and the spool live, and how long images are kept."""

    data_dir: str = "./screener-data"
    database_url: str = ""  # empty: SQLite file under data_dir
    retention_days: int = 30
    patient_id_salt: str = ""  # empty: generated once and kept under data_dir

    def __post_init__(self) -> None:
        if not self.data_dir.strip():
            raise ConfigError("storage.data_dir: give a folder (relative paths are relative to the config file)")
        if self.database_url and "://" not in self.database_url:
            raise ConfigError(f"storage.database_url = {self.database_url!r}: use an SQLAlchemy URL such as "
                              "'postgresql+psycopg://user@host/db', or leave it empty for SQLite under data_dir")
        _positive("storage.retention_days", self.retention_days)


@dataclass(frozen=True)
class WorkerSettings:
    """[worker]: processes that claim queued jobs and run the pipeline on them."""

    workers: int = 0  # 0: one per CPU core
    lease_seconds: float = 300.0
    max_attempts: int = 3
    poll_seconds: float = 1.0
    decode_workers: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or not 0 <= self.workers <= 64:
            raise ConfigError(f"worker.workers = {self.workers!r}: use a whole number from 1 to 64 worker "
                              "processes, or 0 for one per CPU core")
        for key in ("max_attempts", "decode_workers"):
            if not 1 <= getattr(self, key) <= 64:
                raise ConfigError(f"worker.{key} = {getattr(self, key)}: use a whole number from 1 to 64")
        _positive("worker.lease_seconds", self.lease_seconds)
        _positive("worker.poll_seconds", self.poll_seconds)

    def processes(self) -> int:
        """Worker processes to run: ``workers``, or one per CPU core for 0."""
        return self.workers or default_processes()


@dataclass(frozen=True)
class DispatchConfig:
    """[dispatch]: C-STORE SCU to the destinations, with capped exponential backoff."""

    calling_ae: str = _default(DispatchSettings, "calling_ae")
    max_attempts: int = _default(DispatchSettings, "max_attempts")
    backoff_base_s: float = _default(DispatchSettings, "backoff_base_s")
    backoff_cap_s: float = _default(DispatchSettings, "backoff_cap_s")
    interval_s: float = 2.0  # an idle outbox costs one indexed query; results reach PACS sooner

    def __post_init__(self) -> None:
        try:
            self.dispatch_settings()
        except ValueError as exc:
            raise ConfigError(f"dispatch.{exc}") from exc
        _positive("dispatch.interval_s", self.interval_s)

    def dispatch_settings(self) -> DispatchSettings:
        return DispatchSettings(calling_ae=self.calling_ae, max_attempts=self.max_attempts,
                                backoff_base_s=self.backoff_base_s, backoff_cap_s=self.backoff_cap_s)


@dataclass(frozen=True)
class BackfillConfig:
    """[backfill]: screening a PACS archive (`screener backfill`): the PACS to query and
    retrieve from, and the throttle that keeps the backfill from hurting it."""

    source_ae_title: str = ""  # the PACS's AE title (answers C-FIND and C-MOVE)
    source_host: str = ""
    source_port: int = 104
    calling_ae: str = ""  # empty: node.ae_title (the PACS must know it, and where to send to it)
    move_destination: str = ""  # empty: node.ae_title, this node's own SCP
    associations: int = 1  # C-MOVEs at once
    images_per_minute: float = 60.0  # retrieval rate limit; 0: none
    quiet_hours: str = ""  # "07:00-19:00": no retrieval in these local hours (the PACS's busy day)
    max_queued_jobs: int = 50  # wait while more jobs than this wait for a worker
    query_days: int = 7  # C-FIND the date range this many days at a time
    lease_seconds: float = 600.0
    max_attempts: int = 3
    retry_after_s: float = 60.0

    def __post_init__(self) -> None:
        for key in ("source_ae_title", "calling_ae", "move_destination"):
            if getattr(self, key):
                try:
                    validate_ae_title(f"backfill.{key}", getattr(self, key))
                except ValueError as exc:
                    raise ConfigError(str(exc)) from exc
        if not 1 <= self.source_port <= 65535:
            raise ConfigError(f"backfill.source_port = {self.source_port}: use a TCP port 1-65535")
        for key, top in (("associations", 16), ("max_attempts", 100), ("query_days", 366)):
            if not 1 <= getattr(self, key) <= top:
                raise ConfigError(f"backfill.{key} = {getattr(self, key)}: use a whole number from 1 to {top}")
        if self.max_queued_jobs < 1:
            raise ConfigError(f"backfill.max_queued_jobs = {self.max_queued_jobs}: use a whole number >= 1")
        _positive("backfill.images_per_minute", self.images_per_minute, zero_ok=True)
        _positive("backfill.lease_seconds", self.lease_seconds)
        _positive("backfill.retry_after_s", self.retry_after_s, zero_ok=True)
        try:
            self.limits()
        except ValueError as exc:
            raise ConfigError(f"backfill.quiet_hours = {self.quiet_hours!r}: {exc}") from exc

    def limits(self) -> Limits:
        return Limits(associations=self.associations, images_per_minute=self.images_per_minute,
                      quiet_hours=parse_quiet_hours(self.quiet_hours) if self.quiet_hours else None,
                      max_queued_jobs=self.max_queued_jobs, query_days=self.query_days,
                      lease_seconds=self.lease_seconds, max_attempts=self.max_attempts,
                      retry_after_s=self.retry_after_s)


@dataclass(frozen=True)
class DestinationConfig:
    """One [[destinations]] entry: a PACS that receives the SR and/or the GSPS."""

    name: str = ""
    ae_title: str = ""
    host: str = ""
    port: int = 104
    send_sr: bool = True
    send_gsps: bool = True
    send_result_image: bool = True  # Secondary Capture with the results burned in
    send_pdf: bool = True  # Encapsulated PDF report
    # TLS: a CA bundle (PEM) to verify the destination; empty = plain TCP. Optional client
    # certificate and key (PEM), both or neither. Relative paths: relative to the config file
    # (already resolved to absolute paths by parse_config/load_config).
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""

    def destination(self) -> Any:
        from screener.node.dispatch import Destination, TLSConfig

        tls = None
        if self.tls_ca_file:
            tls = TLSConfig(ca_file=Path(self.tls_ca_file),
                            cert_file=Path(self.tls_cert_file) if self.tls_cert_file else None,
                            key_file=Path(self.tls_key_file) if self.tls_key_file else None)
        return Destination(name=self.name, ae_title=self.ae_title, host=self.host, port=self.port,
                           send_sr=self.send_sr, send_gsps=self.send_gsps,
                           send_result_image=self.send_result_image, send_pdf=self.send_pdf, tls=tls)


_TLS_KEYS = ("tls_ca_file", "tls_cert_file", "tls_key_file")


def _resolve_tls(config: DestinationConfig, where: str, base_dir: Path) -> DestinationConfig:
    """TLS file paths made absolute (relative to ``base_dir``) and checked; errors name the key."""
    resolved = _resolve_files(config, where, _TLS_KEYS, base_dir)
    if (config.tls_cert_file or config.tls_key_file) and not config.tls_ca_file:
        raise ConfigError(f"{where}.tls_ca_file: required when tls_cert_file/tls_key_file are set "
                          "(the CA bundle that verifies the destination)")
    if bool(config.tls_cert_file) != bool(config.tls_key_file):
        missing = "tls_key_file" if config.tls_cert_file else "tls_cert_file"
        raise ConfigError(f"{where}.{missing}: tls_cert_file and tls_key_file go together "
                          "(client certificate and its key)")
    return resolved


def build_decode_limits(settings: DecodeSettings) -> DecodeLimits:
    return DecodeLimits(min_side=settings.min_side, max_side=settings.max_side, max_pixels=settings.max_pixels)


def build_inference(settings: ModelSettings):  # -> pipeline.estimate.Inference (imports torch)
    from screener.pipeline.estimate import Inference, Precision

    return Inference(precision=Precision(settings.precision), channels_last=settings.channels_last, compile=settings.compile)


def build_eligibility_rules(settings: EligibilitySettings) -> EligibilityRules:
    return EligibilityRules(**{f.name: getattr(settings, f.name) for f in fields(EligibilitySettings)})


@dataclass(frozen=True)
class Settings:
    model: ModelSettings = field(default_factory=ModelSettings)
    decode: DecodeSettings = field(default_factory=DecodeSettings)
    eligibility: EligibilitySettings = field(default_factory=EligibilitySettings)
    node: NodeSettings = field(default_factory=NodeSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
    backfill: BackfillConfig = field(default_factory=BackfillConfig)
    destinations: tuple[DestinationConfig, ...] = ()
    # Folder that relative paths (storage.data_dir) are resolved against: the config file's
    # folder, or the working folder for the embedded defaults. Not a setting, so not compared.
    base_dir: str = field(default="", compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("base_dir")
        d["storage"]["data_dir"] = str(self.data_dir)
        return d

    @property
    def data_dir(self) -> Path:
        return (Path(self.base_dir or ".") / self.storage.data_dir).resolve()

    @property
    def database_url(self) -> str:
        """``storage.database_url``, else the SQLite file ``screener.db`` under the data folder."""
        return self.storage.database_url or f"sqlite:///{self.data_dir / 'screener.db'}"


def _section(cls: type, name: str, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    defaults = cls()
    values = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{name}.{key}: unknown key; known keys are {', '.join(sorted(known))}")
        values[key] = _typed(f"{name}.{key}", value, getattr(defaults, key))
    return cls(**values)


def _typed(key: str, value: Any, default: Any) -> Any:
    """``value`` as the type of ``default``, or a ConfigError naming ``key``."""
    if isinstance(default, tuple):  # TOML arrays of strings -> tuples (settings are frozen)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key} = {value!r}: expected a list of strings, e.g. [\"CR\", \"DX\"]")
        return tuple(value)
    expected = type(default)
    wanted = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(expected, expected.__name__)
    # bool is an int in Python; "batch_size = true" is still a mistake worth naming.
    if isinstance(value, bool) and expected is not bool:
        raise ConfigError(f"{key} = {value!r}: expected {wanted}")
    if expected is float and isinstance(value, int):
        return float(value)  # "min_age = 50" means 50.0
    if not isinstance(value, expected):
        raise ConfigError(f"{key} = {value!r}: expected {wanted}")
    return value


_SECTIONS = {"model": ModelSettings, "decode": DecodeSettings, "eligibility": EligibilitySettings,
             "node": NodeSettings, "storage": StorageSettings, "worker": WorkerSettings, "dispatch": DispatchConfig,
             "backfill": BackfillConfig}


def _destinations(raw: Any, base_dir: Path) -> tuple[DestinationConfig, ...]:
    if not isinstance(raw, list):
        raise ConfigError("destinations: use [[destinations]] tables (an array of tables)")
    found: list[DestinationConfig] = []
    for n, entry in enumerate(raw):
        where = f"destinations[{n}]"
        config = _resolve_tls(_section(DestinationConfig, where, entry), where, base_dir)
        try:
            config.destination()
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        if any(d.name == config.name for d in found):
            raise ConfigError(f"{where}.name = {config.name!r}: used twice; destination names must be unique")
        found.append(config)
    return tuple(found)


def parse_config(data: dict[str, Any], base_dir: str | Path = "") -> Settings:
    known = sorted([*_SECTIONS, "destinations"])
    for key in data:
        if key not in known:
            raise ConfigError(f"[{key}]: unknown section; known sections are {', '.join(known)}")
    sections = {name: _section(cls, name, data.get(name, {})) for name, cls in _SECTIONS.items()}
    base = Path(base_dir or ".").resolve()
    sections["node"] = _resolve_files(sections["node"], "node", ("tls_cert_file", "tls_key_file", "tls_ca_file"), base)
    return Settings(**sections, destinations=_destinations(data.get("destinations", []), base),
                    base_dir=str(base_dir))


def _resolve_files(section: Any, where: str, keys: tuple[str, ...], base_dir: Path) -> Any:
    """File keys made absolute (relative to the config file's folder) and checked to exist."""
    resolved = {}
    for key in keys:
        value = getattr(section, key)
        if not value:
            continue
        path = Path(value).expanduser()
        path = path if path.is_absolute() else (base_dir / path).resolve()
        if not path.is_file():
            raise ConfigError(f"{where}.{key}: file not found ({path})")
        resolved[key] = str(path)
    return replace(section, **resolved) if resolved else section


def load_config(path: str | Path) -> Settings:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"configuration file {path} not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    # A relative bundle path means "next to this file", whatever the service's working folder.
    bundle = data.get("model", {}).get("bundle") if isinstance(data.get("model"), dict) else None
    if isinstance(bundle, str) and bundle and not Path(bundle).is_absolute():
        data["model"]["bundle"] = str((path.parent / bundle).resolve())
    # storage.data_dir likewise, resolved when used (Settings.data_dir).
    return parse_config(data, base_dir=path.parent.resolve())
