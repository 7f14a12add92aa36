"""What a scan of the model repository finds, without loading anything."""

from __future__ import annotations

from pathlib import Path

from rnnserve.server.repository import scan


def _dirs(root: Path, *names: str) -> None:
    for name in names:
        (root / name).mkdir(parents=True)


def test_version_zero_and_duplicate_numbers_are_ignored_and_reported(tmp_path: Path) -> None:
    _dirs(tmp_path, "m/0", "m/1", "m/01", "m/2", "n/3")
    found, problems = scan(tmp_path)
    assert sorted(found["m"].versions) == [1, 2]
    assert found["m"].versions[1].name == "1"
    assert "versions are numbered from 1" in problems[("m", 0)]
    assert found["m"].policy is not None  # the model itself is fine: it serves 1 and 2
    assert sorted(found["n"].versions) == [3]
    assert ("n", 0) not in problems


def test_an_unreadable_model_config_is_a_problem_not_an_error(tmp_path: Path) -> None:
    _dirs(tmp_path, "m/1", "ok/1")
    (tmp_path / "m" / "config.json").write_bytes(b"\xff\xfe not utf-8")
    found, problems = scan(tmp_path)
    assert found["m"].policy is None  # kept, frozen: what it serves stays
    assert "not valid JSON" in problems[("m", 0)]
    assert found["ok"].policy is not None


def test_the_model_config_is_part_of_each_version_fingerprint(tmp_path: Path) -> None:
    _dirs(tmp_path, "m/1")
    before = scan(tmp_path)[0]["m"].fingerprints[1]
    (tmp_path / "m" / "config.json").write_text('{"max_length": 5}')
    assert scan(tmp_path)[0]["m"].fingerprints[1] != before


def test_every_ignored_version_directory_is_reported(tmp_path: Path) -> None:
    _dirs(tmp_path, "m/0", "m/1", "m/01", "m/001")
    (tmp_path / "m" / "config.json").write_text('{"version_policy": {"versions": []}}')
    found, problems = scan(tmp_path)
    said = problems[("m", 0)]
    assert "version directories 0, 01, 001 ignored" in said
    assert "version_policy" in said  # the broken config too, not instead
    assert found["m"].policy is None
