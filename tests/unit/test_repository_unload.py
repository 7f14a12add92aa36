"""A version leaving service is out of reach before it closes: a call that pins versions (an
ImportSession resolves with `draining_ok`) must not find one that is closing, or the session it
pins is lost with it."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from rnnserve.server.errors import NotFound
from rnnserve.server.repository import Repository
from rnnserve.server.served_model import ServedModel
from rnnserve.server.settings import Settings

import zoo


def test_a_version_is_out_of_reach_while_it_closes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "models"
    zoo.write_repository(root, ["lstm_masked"])
    model = root / "lstm_masked"
    seen_while_closing: list[str] = []
    close = ServedModel.close

    async def closing(self: ServedModel) -> None:
        try:
            repository.resolve(self.name, self.version, draining_ok=True)
            seen_while_closing.append(f"version {self.version} resolved")
        except NotFound:
            seen_while_closing.append(f"version {self.version} out of reach")
        await close(self)

    monkeypatch.setattr(ServedModel, "close", closing)
    repository = Repository(Settings(model_dir=str(root), warmup=False, xla=False))

    async def main() -> None:
        await repository.sync()
        assert repository.versions_of("lstm_masked") == [1]
        shutil.copytree(model / "1", model / "2")  # version 2 arrives; 1 drains and unloads
        await repository.sync()
        assert repository.versions_of("lstm_masked") == [2]
        await repository.close()

    asyncio.run(main())
    assert seen_while_closing[0] == "version 1 out of reach"
