"""A model version's life in the repository, with no server around it."""

from __future__ import annotations

import asyncio
import gc
import logging
import shutil
import weakref
from pathlib import Path
from typing import Any

import pytest

from rnnserve.server.errors import NotFound
from rnnserve.server.repository import Repository
from rnnserve.server.served_model import ServedModel
from rnnserve.server.settings import Settings

import zoo


def test_a_version_is_out_of_reach_while_it_closes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call that pins versions (an ImportSession resolves with `draining_ok`) must not find one
    that is closing, or the session it pins is lost with it."""
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


def test_files_changed_under_a_loaded_version_are_reported_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A loaded version is not reloaded (a half-written file must not replace what serves), and
    a config written after the model loaded would otherwise be ignored without a word."""
    root = tmp_path / "models"
    zoo.write_repository(root, ["lstm_masked"])
    repository = Repository(Settings(model_dir=str(root), warmup=False, xla=False))
    said = "lstm_masked version 1: its files or its model's config.json"
    model_config = root / "lstm_masked" / "config.json"

    async def main() -> list[int]:
        counts = []
        await repository.sync()
        counts.append(caplog.text.count(said))
        (root / "lstm_masked" / "1" / "config.json").write_text('{"description": "late"}')
        for _ in range(2):
            await repository.sync()
            counts.append(caplog.text.count(said))
        assert repository.resolve("lstm_masked").config.description == "lstm_masked"  # not reloaded
        # The version policy, which the README puts in the model's config, is no change to a
        # loaded version (editing it used to warn about every version); a label is.
        model_config.write_text('{"version_policy": {"latest": 2}}')
        await repository.sync()
        counts.append(caplog.text.count(said))
        model_config.write_text('{"version_policy": {"latest": 2}, "description": "new"}')
        await repository.sync()
        counts.append(caplog.text.count(said))
        await repository.close()
        return counts

    with caplog.at_level(logging.WARNING, logger="rnnserve.server.repository"):
        assert asyncio.run(main()) == [0, 1, 1, 1, 2]


def test_an_unloaded_version_is_freed_though_long_lived_objects_are_set_aside(
    tmp_path: Path,
) -> None:
    """Models are set aside from garbage collection once loaded (`heap.settle`); a version
    that unloads must still be freed, cycles and all, not kept for the life of the process."""
    root = tmp_path / "models"
    zoo.write_repository(root, ["lstm_masked"])
    model = root / "lstm_masked"
    repository = Repository(Settings(model_dir=str(root), warmup=False, xla=False))

    async def main() -> tuple[weakref.ref[Any], int]:
        await repository.sync()
        frozen = gc.get_freeze_count()
        first = weakref.ref(repository.resolve("lstm_masked").plan.steps[-1].original)  # Keras
        shutil.copytree(model / "1", model / "2")
        await repository.sync()  # 1 drains and unloads
        await repository.close()
        return first, frozen

    first, frozen = asyncio.run(main())
    assert frozen > 0  # the loaded model was set aside
    assert first() is None, "the unloaded version is still alive"
