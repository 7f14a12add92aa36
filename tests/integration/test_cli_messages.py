"""What the `rnnserve` client commands say when something is wrong, and what their --help says."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rnnserve.server.cli import _read_sequences, main, parser

import zoo

RNNSERVE = str(Path(sys.executable).parent / "rnnserve")
NOWHERE = "127.0.0.1:1"  # the file is read before anything is sent


def test_a_missing_input_file_is_one_line_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.npy"
    ran = subprocess.run(
        [RNNSERVE, "predict", "m", str(missing), "--target", NOWHERE],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 1
    assert ran.stderr.strip() == f"{missing}: cannot read it: No such file or directory"


@pytest.mark.parametrize("name", ["nope.npz", "nope.csv", "dir.npy", "junk.npy", "junk.npz"])
def test_unreadable_input_files_are_named(tmp_path: Path, name: str) -> None:
    (tmp_path / "dir.npy").mkdir()
    (tmp_path / "junk.npy").write_text("not an array\n")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 cut short")
    path = tmp_path / name
    with pytest.raises(SystemExit) as exc:
        main(["predict", "m", str(path), "--target", NOWHERE])
    assert str(exc.value).startswith(f"{path}: ")


def test_an_archive_named_npy_is_refused_not_sent(tmp_path: Path) -> None:
    path = tmp_path / "zipped.npy"
    with path.open("wb") as f:  # np.savez would add .npz to a str path, not to a file
        np.savez(f, x=np.ones((3, 2), np.float32))
    with pytest.raises(SystemExit) as exc:
        main(["predict", "m", str(path), "--target", NOWHERE])
    assert str(exc.value) == f"{path}: an .npz archive named .npy; rename it to .npz"


def test_inputs_read_as_a_user_writes_them(tmp_path: Path) -> None:
    """A header row in a .csv is skipped (numpy's error on 'f0' before), an empty .csv says so
    (a numpy warning and a server error before), and a 1-D float .npy is one feature per step,
    as a one-column .csv already was (refused as "expected [T, 1]" before)."""
    (tmp_path / "header.csv").write_text("f0,f1\n1,2\n3,4\n")
    (tmp_path / "empty.csv").write_text("\n")
    np.save(tmp_path / "flat.npy", np.arange(5, dtype=np.float32))
    read = _read_sequences([str(tmp_path / n) for n in ("header.csv", "flat.npy")], lambda: False)
    assert [x.tolist() for _, x in read] == [[[1, 2], [3, 4]], [[0], [1], [2], [3], [4]]]
    with pytest.raises(SystemExit) as exc:
        _read_sequences([str(tmp_path / "empty.csv")], lambda: False)
    assert (
        str(exc.value)
        == f"{tmp_path / 'empty.csv'}: no rows of numbers; expected one row per timestep"
    )


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_a_timeout_that_cannot_work_is_a_usage_error(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """It used to be sent, and every call ended DEADLINE_EXCEEDED."""
    with pytest.raises(SystemExit) as exc:
        main(["predict", "m", "x.npy", "--timeout", value, "--target", NOWHERE])
    assert exc.value.code == 2
    assert f"expected a number of seconds > 0, got {value}" in capsys.readouterr().err


def test_health_of_an_unknown_model_says_so_and_lists_the_served(
    zoo_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["health", "--model", "nope", "--target", zoo_server.target]) == 1
    err = capsys.readouterr().err.strip()
    served = ", ".join(sorted(zoo.BY_NAME))
    assert (
        err
        == f"unhealthy: NOT_FOUND: the server serves no model named 'nope' (it serves: {served})"
    )


def test_health_of_an_unknown_model_without_the_listing(
    zoo_repository: Any, serve: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ListModels needs a token where health does not: the answer is given without the list."""
    root = zoo.subset(zoo_repository[0], ["lstm_masked"], tmp_path / "models")
    server = serve(model_dir=str(root), warmup=False, tokens="secret")
    assert main(["health", "--model", "nope", "--target", server.target]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "unhealthy: NOT_FOUND: the server serves no model named 'nope'"


def test_a_refused_sequence_is_named_by_its_file(
    zoo_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = np.ones((4, zoo.D), np.float32)
    np.savez(tmp_path / "a.npz", x=good, y=good)
    np.savetxt(tmp_path / "b.csv", good, delimiter=",")
    np.save(tmp_path / "bad.npy", np.ones((20, 5), np.float32))
    np.savez(tmp_path / "c.npz", ok=good, wide=np.ones((3, 7), np.float32))
    files = [str(tmp_path / n) for n in ("a.npz", "b.csv", "bad.npy")]
    for inputs, where, shape in [
        (files, f"sequence 3 ({tmp_path / 'bad.npy'})", "[20, 5]"),
        ([files[1], str(tmp_path / "c.npz")], f"sequence 2 ({tmp_path / 'c.npz'}:wide)", "[3, 7]"),
    ]:
        assert main(["predict", "lstm_masked", *inputs, "--target", zoo_server.target]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: INVALID_ARGUMENT: {where}: expected float32 features"), err
        assert err.endswith(f"got shape {shape}"), err


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # unwrapped


def test_help_explains_every_client_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RNNSERVE_TARGET", "example:9000")
    for command in ("predict", "metadata"):
        text = _help([command], capsys)
        assert "--version VERSION model version (0: the latest ready one)" in text
        assert "--target TARGET server address host:port (default: example:9000;" in text
        assert "env RNNSERVE_TARGET, else 127.0.0.1:$RNNSERVE_PORT, else 127.0.0.1:8500" in text
    text = _help(["predict"], capsys)
    assert "--output {default,sequence,steps,both} default: each output in its own kind" in text
    assert (
        "--top-k TOP_K for outputs with labels, the best classes to show (0: none; default: 3)"
        in text
    )
    assert "Check that the server, or one model with --model, is serving" in _help(
        ["health"], capsys
    )


def test_version_is_the_installed_package_s_and_leaves_model_versions_alone(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"rnnserve {importlib.metadata.version('rnnserve')}"
    assert parser().parse_args(["predict", "--version", "2", "m", "a.npy"]).version == 2
    assert parser().parse_args(["metadata", "m", "--version", "3"]).version == 3
