from __future__ import annotations

from pathlib import Path

import pytest

from rnnserve.server import settings as settings_mod
from rnnserve.server.settings import Settings


def test_defaults_bind_loopback_and_serve_the_repository_models() -> None:
    s = settings_mod.load({}, env={})
    assert s.host == "127.0.0.1"
    assert s.port == 8500
    assert Path(s.model_dir).name == "models"


def test_flags_beat_environment_beat_file(tmp_path: Path) -> None:
    config = tmp_path / "rnnserve.toml"
    config.write_text("[server]\nport = 7000\nmax_batch_size = 8\nsession_ttl = 5.5\n")
    env = {"RNNSERVE_PORT": "7100", "RNNSERVE_ALLOW_CODE": "true"}
    s = settings_mod.load({"config": str(config), "max_batch_size": "16"}, env=env)
    assert s.max_batch_size == 16  # flag
    assert s.port == 7100  # environment over file
    assert s.session_ttl == 5.5  # file
    assert s.allow_code is True


def test_bad_values_name_the_setting(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="RNNSERVE_PORT: port expects int"):
        settings_mod.load({}, env={"RNNSERVE_PORT": "eighty"})
    with pytest.raises(SystemExit, match="log_format must be one of"):
        settings_mod.load({"log_format": "xml"}, env={})
    config = tmp_path / "c.toml"
    config.write_text("prot = 1\n")
    with pytest.raises(SystemExit, match="unknown settings"):
        settings_mod.load({"config": str(config)}, env={})


def test_every_setting_has_a_flag_and_help() -> None:
    parser = settings_mod.argparse.ArgumentParser()
    settings_mod.add_arguments(parser)
    text = " ".join(parser.format_help().split())  # unwrapped
    for name in Settings.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text
        assert "RNNSERVE_" + name.upper() in text
    assert "--log-level {debug,info,warning,error}" in text  # the values a setting accepts
    assert "--session-overflow {evict,refuse}" in text
    assert "[env RNNSERVE_CONFIG]" in text


def test_readme_documents_every_setting() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name in Settings.__dataclass_fields__:
        assert f"`--{name.replace('_', '-')}`" in readme, f"README lacks --{name}"
        assert f"`RNNSERVE_{name.upper()}`" in readme


def test_values_out_of_range_are_refused_at_start(tmp_path: Path) -> None:
    """A zero or negative count, port or time would fail later and far from its cause (every
    model failing to load, every call refused, every session expired at once): refused here,
    naming the setting."""
    for flags, message in [
        ({"workers": "0"}, "--workers: workers must be at least 1, got '0'"),
        ({"max_queue": "0"}, "max_queue must be at least 1"),
        ({"max_message_mb": "0"}, "max_message_mb must be from 1 to 2047"),
        ({"session_ttl": "0"}, "session_ttl must be more than 0"),
        ({"grace": "-3"}, "grace must be at least 0"),
        ({"metrics_port": "-7"}, "metrics_port must be from -1 to 65535"),
        ({"port": "70000"}, "port must be from 0 to 65535"),
        # Past gRPC's 32-bit sizes: a traceback after the models had loaded.
        ({"max_message_mb": "4096"}, "max_message_mb must be from 1 to 2047"),
        ({"max_pending_rpcs": "1000000000"}, "max_pending_rpcs must be from 1 to 100000"),
        # Not numbers that mean anything: a NaN TTL never expires a session.
        ({"session_ttl": "nan"}, "session_ttl expects a finite number, got 'nan'"),
        ({"poll_interval": "nan"}, "poll_interval expects a finite number"),
        ({"grace": "inf"}, "grace expects a finite number"),
        ({"host": " "}, "host must not be empty"),
    ]:
        with pytest.raises(SystemExit, match=message):
            settings_mod.load(flags, env={})
    assert settings_mod.load({"metrics_port": "-1", "grace": "0"}, env={}).metrics_port == -1
    config = tmp_path / "c.toml"
    for line in ("max_batch_size = 32.9", "workers = true"):
        config.write_text(line + "\n")
        with pytest.raises(SystemExit, match="expects int"):
            settings_mod.load({"config": str(config)}, env={})
    config.write_text("max_batch_size = 32.0\n")
    assert settings_mod.load({"config": str(config)}, env={}).max_batch_size == 32


def test_a_setting_beside_the_server_table_is_refused_not_ignored(tmp_path: Path) -> None:
    """With a [server] table only its keys were read: `max_batch_size = 32` above it stayed 64
    in silence, though an unknown key is refused."""
    config = tmp_path / "c.toml"
    config.write_text("max_batch_size = 32\n[server]\nport = 7000\n")
    with pytest.raises(SystemExit, match=r"every setting goes in it; found \['max_batch_size'\]"):
        settings_mod.load({"config": str(config)}, env={})
    config.write_text("server = 3\n")
    with pytest.raises(SystemExit, match="server must be a \\[server\\] table"):
        settings_mod.load({"config": str(config)}, env={})
    config.write_text("[server]\nport = 7000\nmax_batch_size = 32\n")
    assert settings_mod.load({"config": str(config)}, env={}).max_batch_size == 32
