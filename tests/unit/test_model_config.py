"""A model's config.json: values that would break serving later are refused when it is read, with
the key named (the repository then reports the version or the model, and serves the others)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rnnserve.server.model_config import ConfigError, read_config, read_policy


def _write(directory: Path, config: dict[str, object]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize(
    ("batching", "message"),
    [
        ({"workers": 0}, "batching.workers must be a positive integer, got 0"),
        ({"max_batch_size": 8.5}, "batching.max_batch_size must be a positive integer"),
        ({"max_queue": True}, "batching.max_queue must be a positive integer"),
        ({"gather_ms": -1}, "batching.gather_ms must be a number of milliseconds >= 0"),
        ({"max_delay_ms": "2"}, "batching.max_delay_ms must be a number of milliseconds >= 0"),
    ],
)
def test_bad_batching_values_are_refused(
    tmp_path: Path, batching: dict[str, object], message: str
) -> None:
    version = _write(tmp_path / "m" / "1", {"batching": batching})
    with pytest.raises(ConfigError, match=message):
        read_config(tmp_path / "m", version)


def test_good_batching_values_pass(tmp_path: Path) -> None:
    good = {"workers": 2, "max_batch_size": 16, "gather_ms": 0, "max_delay_ms": 0.5}
    version = _write(tmp_path / "m" / "1", {"batching": good})
    assert read_config(tmp_path / "m", version).batching == good


@pytest.mark.parametrize(
    "policy", [{"versions": []}, {"latest": True}, {"versions": [1, True]}, {"latest": 0}]
)
def test_a_version_policy_that_names_nothing_sensible_is_refused(
    tmp_path: Path, policy: dict[str, object]
) -> None:
    """`{"versions": []}` used to serve the latest version; `true` passed for a number."""
    model = _write(tmp_path / "m", {"version_policy": policy})
    with pytest.raises(ConfigError, match="bad version_policy"):
        read_policy(model)


def test_version_policies_select_what_they_say(tmp_path: Path) -> None:
    for policy, chosen in [
        ({"latest": 2}, [2, 3]),
        ({"versions": [1, 3]}, [1, 3]),
        ({"all": True}, [1, 2, 3]),
    ]:
        model = _write(tmp_path / "m", {"version_policy": policy})
        assert read_policy(model).select([3, 1, 2]) == chosen
