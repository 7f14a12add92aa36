"""Per-model configuration: `models/<name>/config.json` (all versions) merged with
`models/<name>/<version>/config.json` (that version), the version's keys winning.

```json
{
  "description": "Speaker of a Japanese vowel utterance",
  "max_length": 64,
  "outputs": {"speaker": {"labels": ["1", "2", "..."]}},
  "batching": {"max_batch_size": 64, "max_batch_timesteps": 16384, "max_delay_ms": 0},
  "version_policy": {"latest": 1}
}
```
`version_policy` (model level only) is `{"latest": N}`, `{"all": true}` or `{"versions": [1, 3]}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
_KEYS = {"description", "max_length", "outputs", "batching", "version_policy"}
_BATCHING_KEYS = {
    "max_batch_size",
    "max_batch_timesteps",
    "max_delay_ms",
    "gather_ms",
    "max_queue",
    "workers",
}


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class VersionPolicy:
    latest: int | None = 1  # serve the N highest versions
    versions: tuple[int, ...] = ()  # or exactly these
    all: bool = False

    def select(self, available: list[int]) -> list[int]:
        ordered = sorted(available)
        if self.all:
            return ordered
        if self.versions:
            return [v for v in ordered if v in self.versions]
        return ordered[-(self.latest or 1) :]


@dataclass(frozen=True)
class ModelConfig:
    description: str = ""
    max_length: int | None = None
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict)
    batching: dict[str, Any] = field(default_factory=dict)
    version_policy: VersionPolicy = VersionPolicy()


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc}") from exc
    except ValueError as exc:  # not UTF-8, or not JSON
        raise ConfigError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    unknown = set(data) - _KEYS
    if unknown:
        raise ConfigError(
            f"{path}: unknown keys {sorted(unknown)}; expected some of {sorted(_KEYS)}"
        )
    return data


def _policy(raw: Any, where: Path) -> VersionPolicy:
    if not isinstance(raw, dict) or len(raw) != 1:
        raise ConfigError(f"{where}: version_policy must be one of latest / all / versions")
    ((key, value),) = raw.items()
    if key == "latest" and isinstance(value, int) and value >= 1:
        return VersionPolicy(latest=value)
    if key == "all" and value is True:
        return VersionPolicy(latest=None, all=True)
    if key == "versions" and isinstance(value, list) and all(isinstance(v, int) for v in value):
        return VersionPolicy(latest=None, versions=tuple(value))
    raise ConfigError(f"{where}: bad version_policy {raw!r}")


def read_policy(model_dir: Path) -> VersionPolicy:
    path = model_dir / CONFIG_FILE
    raw = _read(path).get("version_policy")
    return VersionPolicy() if raw is None else _policy(raw, path)


def read_config(model_dir: Path, version_dir: Path) -> ModelConfig:
    model_level = _read(model_dir / CONFIG_FILE)
    version_level = _read(version_dir / CONFIG_FILE)
    if "version_policy" in version_level:
        raise ConfigError(
            f"{version_dir / CONFIG_FILE}: version_policy belongs in the model's config"
        )
    merged = {**model_level, **version_level}
    batching = {**model_level.get("batching", {}), **version_level.get("batching", {})}
    unknown = set(batching) - _BATCHING_KEYS
    if unknown:
        raise ConfigError(
            f"batching: unknown keys {sorted(unknown)}; expected {sorted(_BATCHING_KEYS)}"
        )
    labels: dict[str, tuple[str, ...]] = {}
    for name, spec in merged.get("outputs", {}).items():
        if not isinstance(spec, dict) or not isinstance(spec.get("labels", []), list):
            raise ConfigError(f'outputs.{name}: expected {{"labels": [...]}}')
        labels[name] = tuple(str(label) for label in spec.get("labels", []))
    max_length = merged.get("max_length")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ConfigError(f"max_length must be a positive integer, got {max_length!r}")
    return ModelConfig(
        description=str(merged.get("description", "")),
        max_length=max_length,
        labels=labels,
        batching=batching,
        version_policy=read_policy(model_dir),
    )
