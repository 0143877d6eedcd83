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

__all__ = ["ConfigError", "ModelSettings", "Settings", "load_config", "parse_config"]


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


@dataclass(frozen=True)
class Settings:
    model: ModelSettings = field(default_factory=ModelSettings)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _section(cls: type, name: str, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{name}.{key}: unknown key; known keys are {', '.join(sorted(known))}")
        expected = type(getattr(cls(), key))
        # bool is an int in Python; "batch_size = true" is still a mistake worth naming.
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            raise ConfigError(f"{name}.{key} = {value!r}: expected {expected.__name__}")
    return cls(**raw)


def parse_config(data: dict[str, Any]) -> Settings:
    sections = {"model": ModelSettings}
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
    return parse_config(data)
