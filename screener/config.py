"""TOML configuration -> typed, validated settings.

Every error names the key (``model.device``) and says what would be accepted, because the
person reading it is an administrator editing a file, not a developer reading a traceback.
Unknown keys are errors too: a misspelt key silently ignored is a setting silently lost.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from screener.pipeline.decode import DecodeLimits
from screener.pipeline.eligibility import EligibilityRules

__all__ = [
    "ConfigError",
    "DecodeSettings",
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


@dataclass(frozen=True)
class ModelSettings:
    bundle: str = ""  # empty: the demo bundle shipped in the package
    device: str = "auto"  # cpu, cuda, cuda:N or auto
    batch_size: int = 8

    def __post_init__(self) -> None:
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
    min_thorax_width: float = _RULES.min_thorax_width
    max_thorax_width: float = _RULES.max_thorax_width
    min_thorax_aspect: float = _RULES.min_thorax_aspect
    max_thorax_aspect: float = _RULES.max_thorax_aspect
    max_spine_tilt_deg: float = _RULES.max_spine_tilt_deg
    min_roi_inside: float = _RULES.min_roi_inside
    inverted_margin: float = _RULES.inverted_margin

    def __post_init__(self) -> None:
        for uid in self.sop_classes:
            parts = uid.split(".")
            if len(uid) > 64 or not all(part.isdigit() and (part == "0" or not part.startswith("0")) for part in parts):
                raise ConfigError(f"eligibility.sop_classes: {uid!r} is not a DICOM UID (digits and dots, e.g. '1.2.840.10008.5.1.4.1.1.1')")
        try:
            build_eligibility_rules(self)
        except ValueError as exc:
            raise _pipeline_error("eligibility", "EligibilityRules.", exc) from exc


def build_decode_limits(settings: DecodeSettings) -> DecodeLimits:
    return DecodeLimits(min_side=settings.min_side, max_side=settings.max_side, max_pixels=settings.max_pixels)


def build_eligibility_rules(settings: EligibilitySettings) -> EligibilityRules:
    return EligibilityRules(**{f.name: getattr(settings, f.name) for f in fields(EligibilitySettings)})


@dataclass(frozen=True)
class Settings:
    model: ModelSettings = field(default_factory=ModelSettings)
    decode: DecodeSettings = field(default_factory=DecodeSettings)
    eligibility: EligibilitySettings = field(default_factory=EligibilitySettings)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def parse_config(data: dict[str, Any]) -> Settings:
    sections = {"model": ModelSettings, "decode": DecodeSettings, "eligibility": EligibilitySettings}
    for key in data:
        if key not in sections:
            raise ConfigError(f"[{key}]: unknown section; known sections are {', '.join(sorted(sections))}")
    return Settings(**{name: _section(cls, name, data.get(name, {})) for name, cls in sections.items()})


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
    return parse_config(data)
