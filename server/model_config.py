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
`version_policy` (model level only) is `{"latest": N}`, `{"all": true}` or `{"versions": [1, 3]}`
(not empty). Batching counts are positive integers, its `_ms` keys milliseconds >= 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
_KEYS = {"description", "max_length", "outputs", "batching", "version_policy"}
# Each batching key: whether it counts something (a positive integer) or is milliseconds (>= 0).
_BATCHING_KEYS = {
    "max_batch_size": int,
    "max_batch_timesteps": int,
    "max_delay_ms": float,
    "gather_ms": float,
    "max_queue": int,
    "workers": int,
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON's true is no number


def _policy(raw: Any, where: Path) -> VersionPolicy:
    if not isinstance(raw, dict) or len(raw) != 1:
        raise ConfigError(f"{where}: version_policy must be one of latest / all / versions")
    ((key, value),) = raw.items()
    if key == "latest" and _is_int(value) and value >= 1:
        return VersionPolicy(latest=value)
    if key == "all" and value is True:
        return VersionPolicy(latest=None, all=True)
    if key == "versions" and isinstance(value, list) and value and all(map(_is_int, value)):
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
    unknown = set(batching) - set(_BATCHING_KEYS)
    if unknown:
        raise ConfigError(
            f"batching: unknown keys {sorted(unknown)}; expected {sorted(_BATCHING_KEYS)}"
        )
    for key, value in batching.items():
        if _BATCHING_KEYS[key] is int and not (_is_int(value) and value >= 1):
            raise ConfigError(f"batching.{key} must be a positive integer, got {value!r}")
        if _BATCHING_KEYS[key] is float and not (
            isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
        ):
            raise ConfigError(
                f"batching.{key} must be a number of milliseconds >= 0, got {value!r}"
            )
    labels: dict[str, tuple[str, ...]] = {}
    for name, spec in merged.get("outputs", {}).items():
        if not isinstance(spec, dict) or not isinstance(spec.get("labels", []), list):
            raise ConfigError(f'outputs.{name}: expected {{"labels": [...]}}')
        labels[name] = tuple(str(label) for label in spec.get("labels", []))
    max_length = merged.get("max_length")
    if max_length is not None and (not _is_int(max_length) or max_length < 1):
        raise ConfigError(f"max_length must be a positive integer, got {max_length!r}")
    return ModelConfig(
        description=str(merged.get("description", "")),
        max_length=max_length,
        labels=labels,
        batching=batching,
        version_policy=read_policy(model_dir),
    )
