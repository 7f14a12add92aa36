"""Server settings: one object, fed by command-line flags > `RNNSERVE_*` environment variables >
a TOML config file (`--config`, section `[server]` or top level) > defaults.

Each field below is one setting; its flag is `--field-name` and its variable `RNNSERVE_FIELD_NAME`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_REPO_MODELS = Path(__file__).resolve().parent.parent / "models"


class CannotStart(Exception):
    """Settings that load but cannot work (a file missing, a port taken): the start ends with
    this one line, before any model loads."""


def _default_model_dir() -> str:
    # A source checkout serves its own models/; an installed package serves ./models.
    return str(_REPO_MODELS if _REPO_MODELS.is_dir() else Path("models"))


def _setting(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class Settings:
    host: str = _setting(
        "127.0.0.1", "address to bind (0.0.0.0 to listen on every interface)", nonempty=True
    )
    port: int = _setting(8500, "gRPC port (0 picks a free one)", low=0, high=65535)
    model_dir: str = _setting(_default_model_dir(), "model repository: <dir>/<name>/<version>/")
    metrics_port: int = _setting(
        8501, "Prometheus /metrics HTTP port (-1 disables, 0 picks one)", low=-1, high=65535
    )
    metrics_host: str = _setting("", "address for /metrics (default: same as --host)")
    # Batching defaults; a model's config.json may override them.
    max_batch_size: int = _setting(64, "most sequences in one batch", low=1)
    max_batch_timesteps: int = _setting(
        32768, "most padded timesteps in one batch (rows x longest)", low=1
    )
    max_delay_ms: float = _setting(0.0, "wait up to this long for a fuller batch when idle", low=0)
    gather_ms: float = _setting(
        10.0,
        "under load (the last batch held several sequences), wait up to this long for a fuller "
        "batch while sequences keep arriving; 0 turns it off",
        low=0,
    )
    max_queue: int = _setting(4096, "most sequences waiting per model version", low=1)
    workers: int = _setting(1, "batches computed at the same time per model version", low=1)
    # Request limits.
    max_length: int = _setting(
        100_000, "most timesteps in one sequence (models may set less)", low=1
    )
    max_sequences: int = _setting(1024, "most sequences in one Predict request", low=1)
    max_request_timesteps: int = _setting(1_000_000, "most timesteps in one request, summed", low=1)
    # gRPC holds message sizes and its queue bounds as 32-bit signed integers.
    max_message_mb: int = _setting(64, "largest gRPC message, in MiB", low=1, high=2047)
    max_pending_rpcs: int = _setting(
        256,
        "calls arrived but not yet taken up by the server; beyond it gRPC sheds new ones "
        "(more and more up to 4x, then all) so that an overloaded server answers fast",
        low=1,
        high=100_000,
    )
    # Sessions.
    session_ttl: float = _setting(600.0, "seconds of idleness before a session is evicted", above=0)
    max_sessions: int = _setting(100_000, "most open sessions", low=1)
    session_overflow: str = _setting(
        "evict",
        "when max_sessions is reached: evict the least recently used, or refuse",
        choices=("evict", "refuse"),
    )
    session_snapshot: str = _setting(
        "", "file to save sessions to on shutdown and restore at start"
    )
    # Models.
    poll_interval: float = _setting(
        0.0, "seconds between model repository scans (0: no reload)", low=0
    )
    allow_code: bool = _setting(False, "load models that carry code (Lambda layers, unsafe mode)")
    warmup: bool = _setting(
        True, "compile XLA for typical shapes before a model takes traffic (slower start)"
    )
    xla: bool = _setting(True, "run batches through XLA programs compiled per shape bucket")
    compute_process: bool = _setting(
        False,
        "compute each model's batches in a child process of its own (a second copy of the "
        "model; the event loop no longer waits on the model's calls)",
    )
    # Operations.
    grace: float = _setting(
        20.0, "seconds to finish in-flight work on SIGTERM before exiting", low=0
    )
    log_format: str = _setting("text", "log format", choices=("text", "json"))
    log_level: str = _setting("info", "log level", choices=("debug", "info", "warning", "error"))
    # Security.
    tls_cert: str = _setting("", "server certificate (PEM); enables TLS")
    tls_key: str = _setting("", "server private key (PEM)")
    tls_client_ca: str = _setting("", "CA bundle to verify client certificates (mutual TLS)")
    token_file: str = _setting("", "file of accepted bearer tokens, one per line")
    tokens: str = _setting("", "accepted bearer tokens, comma-separated (prefer --token-file)")

    @property
    def metrics_bind(self) -> str:
        return self.metrics_host or self.host


def _fields() -> list[dataclasses.Field[Any]]:
    return list(dataclasses.fields(Settings))


def _coerce(f: dataclasses.Field[Any], value: Any, source: str) -> Any:
    kind: type[Any] = type(f.default)
    try:
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError(value)  # TOML's true is not a number
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)  # 32.9 is no count of anything
        if kind is bool and isinstance(value, str):
            lowered = value.strip().lower()
            if lowered not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                raise ValueError(value)
            result: Any = lowered in {"1", "true", "yes", "on"}
        else:
            result = kind(value)
        if kind is float and not math.isfinite(result):
            raise ValueError(value)  # a NaN TTL would never expire; an infinite grace never ends
    except (TypeError, ValueError) as exc:
        what = "a finite number" if kind is float else kind.__name__
        raise SystemExit(f"{source}: {f.name} expects {what}, got {value!r}") from exc
    if f.metadata.get("nonempty") and not result.strip():
        raise SystemExit(f"{source}: {f.name} must not be empty, got {value!r}")
    choices = f.metadata.get("choices")
    if choices and result not in choices:
        raise SystemExit(f"{source}: {f.name} must be one of {', '.join(choices)}, got {value!r}")
    low, high, above = (f.metadata.get(k) for k in ("low", "high", "above"))
    if (low is not None and result < low) or (high is not None and result > high):
        within = f"at least {low}" if high is None else f"from {low} to {high}"
        raise SystemExit(f"{source}: {f.name} must be {within}, got {value!r}")
    if above is not None and result <= above:
        raise SystemExit(f"{source}: {f.name} must be more than {above}, got {value!r}")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; defaults stay None so that unset flags fall through to env/file."""
    parser.add_argument(
        "--config", help="TOML settings file ([server] table) [env RNNSERVE_CONFIG]"
    )
    for f in _fields():
        flag = "--" + f.name.replace("_", "-")
        env = "RNNSERVE_" + f.name.upper()
        help_text = f"{f.metadata['help']} [env {env}; default {f.default!r}]"
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            # Choices only shown: `_coerce` checks them for every source, with its own message.
            choices = f.metadata.get("choices")
            metavar = "{" + ",".join(choices) + "}" if choices else type(f.default).__name__.upper()
            parser.add_argument(flag, type=str, metavar=metavar, help=help_text)


def load(flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Resolve settings from parsed flags, the environment and the config file they name."""
    flags = dict(flags or {})
    env = os.environ if env is None else env
    config_path = flags.pop("config", None) or env.get("RNNSERVE_CONFIG")
    file_values: dict[str, Any] = {}
    if config_path:
        try:
            data = tomllib.loads(Path(config_path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SystemExit(f"config file {config_path}: {exc}") from exc
        file_values = data.get("server", data)
        if not isinstance(file_values, dict):
            raise SystemExit(f"config file {config_path}: server must be a [server] table")
        outside = sorted(set(data) - {"server"}) if file_values is not data else []
        if outside:  # they would not be read
            raise SystemExit(
                f"config file {config_path}: with a [server] table every setting goes in it; "
                f"found {outside} outside it"
            )
        unknown = set(file_values) - {f.name for f in _fields()}
        if unknown:
            raise SystemExit(f"config file {config_path}: unknown settings {sorted(unknown)}")
    values: dict[str, Any] = {}
    for f in _fields():
        if flags.get(f.name) is not None:
            values[f.name] = _coerce(f, flags[f.name], "--" + f.name.replace("_", "-"))
        elif ("RNNSERVE_" + f.name.upper()) in env:
            name = "RNNSERVE_" + f.name.upper()
            values[f.name] = _coerce(f, env[name], name)
        elif f.name in file_values:
            values[f.name] = _coerce(f, file_values[f.name], str(config_path))
    return Settings(**values)
