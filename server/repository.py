"""The model repository: `<root>/<name>/<version>/` directories, loaded, served and reloaded.

A scan decides which versions should serve (by each model's version policy). New versions load and
warm up off the event loop and take traffic only when ready; a version that fails to load is
reported and never disturbs the others; a version that leaves the policy drains (no new requests,
in-flight work and pinned sessions finish) and then unloads.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rnnserve.server import heap
from rnnserve.server.batching import BatchObserver
from rnnserve.server.errors import NotFound, quoted
from rnnserve.server.model_config import (
    CONFIG_FILE,
    ConfigError,
    VersionPolicy,
    read_config,
    read_policy,
)
from rnnserve.server.served_model import LoadState, ServedModel, load_version, warm_up_sequences
from rnnserve.server.settings import Settings

log = logging.getLogger(__name__)

# Called on every load event: (model, version, event, seconds the load took or None), where event
# is one of "loading", "ready", "failed", "draining", "unloaded" (also: a failure forgotten).
# Version 0 is the model as a whole (its config), which only fails and recovers.
Listener = Callable[[str, int, str, float | None], None]


@dataclass(frozen=True)
class VersionStatus:
    name: str
    version: int
    state: LoadState
    error: str = ""


@dataclass(frozen=True)
class Found:
    """One model directory as scanned: its version policy (None while the model's own config is
    broken) and version directories."""

    policy: VersionPolicy | None
    versions: dict[int, Path]
    fingerprints: dict[int, Fingerprint]


Fingerprint = tuple[float, int, str]


def _fingerprint(version_dir: Path) -> Fingerprint:
    """Changes when any file of the version changes, or what the version takes from the model's
    config (everything but its version policy), so a fixed broken version is retried."""
    stats = [p.stat() for p in version_dir.iterdir()]
    return (
        max((s.st_mtime for s in stats), default=0.0),
        sum(s.st_size for s in stats),
        _settings_digest(version_dir.parent / CONFIG_FILE),
    )


def _settings_digest(model_config: Path) -> str:
    try:
        raw = model_config.read_bytes()
    except OSError:
        raw = b"{}"  # none: as an empty one
    try:
        data = json.loads(raw)
    except ValueError:
        return hashlib.sha256(raw).hexdigest()
    if isinstance(data, dict):
        data.pop("version_policy", None)  # which versions serve: nothing a loaded one uses
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def scan(root: Path) -> tuple[dict[str, Found], dict[tuple[str, int], str]]:
    """Every model directory with numbered versions, and problems found while scanning (keyed by
    model and version 0 when they concern the model as a whole)."""
    found: dict[str, Found] = {}
    problems: dict[tuple[str, int], str] = {}
    if not root.is_dir():
        raise FileNotFoundError(f"model repository {root} is not a directory")
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        versions: dict[int, Path] = {}
        ignored: list[str] = []
        numbered = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
        for path in sorted(numbered, key=lambda p: (int(p.name), len(p.name))):  # 1 before 01
            version = int(path.name)
            if version == 0 or version in versions:  # 0 means "latest" in the API; 1 and 01
                ignored.append(path.name)
                continue
            versions[version] = path
        if ignored:
            what = "directory" if len(ignored) == 1 else "directories"
            problems[(model_dir.name, 0)] = (
                f"version {what} {', '.join(ignored)} ignored: versions are numbered from 1, "
                "one directory each"
            )
        if not versions:
            continue
        policy: VersionPolicy | None
        try:
            policy = read_policy(model_dir)
        except ConfigError as exc:
            earlier = problems.get((model_dir.name, 0))
            problems[(model_dir.name, 0)] = f"{earlier}; {exc}" if earlier else str(exc)
            policy = None
        prints = {v: _fingerprint(path) for v, path in versions.items()}
        found[model_dir.name] = Found(policy, versions, prints)
    return found, problems


class Repository:
    def __init__(
        self,
        settings: Settings,
        *,
        observer_for: Callable[[str, int], BatchObserver | None] = lambda name, version: None,
        listener: Listener | None = None,
    ) -> None:
        self.root = Path(settings.model_dir)
        self.settings = settings
        self._observer_for = observer_for
        self._listener = listener
        self._served: dict[str, dict[int, ServedModel]] = {}
        self._failed: dict[tuple[str, int], str] = {}
        self._failed_prints: dict[tuple[str, int], Fingerprint] = {}
        self._loaded_prints: dict[tuple[str, int], Fingerprint] = {}
        self._loading: set[tuple[str, int]] = set()
        # Load threads still at work, also those whose caller was cancelled (a stop while
        # loading): a thread cannot be stopped, and an exit that waits for it waits tens of s.
        self._threads_loading = 0
        self._threads_lock = threading.Lock()
        self._sync_lock = asyncio.Lock()

    # ---- lookups (event loop only) ----

    def resolve(self, name: str, version: int = 0, *, draining_ok: bool = False) -> ServedModel:
        """The version that serves `name` (the latest ready one when `version` is 0)."""
        versions = self._served.get(name)
        if versions:
            if version:
                model = versions.get(version)
                if model is not None and _usable(model, draining_ok):
                    return model
            else:
                best: ServedModel | None = None
                for model in versions.values():
                    newer = best is None or model.version > best.version
                    if newer and _usable(model, draining_ok):
                        best = model
                if best is not None:
                    return best
        raise self._not_found(name, version, draining_ok)

    def _not_found(self, name: str, version: int, draining_ok: bool) -> NotFound:
        versions = self._served.get(name)
        if not versions:
            known = ", ".join(sorted(self._served)) or "none"
            why = self._failed_reason(name)
            return NotFound(f"model {quoted(name)} is not served{why}; models served: {known}")
        ready = sorted(v for v, m in versions.items() if _usable(m, draining_ok))
        listed = ", ".join(map(str, ready)) or "none"
        return NotFound(
            f"model {name!r} has no version {version} ready{self._failed_reason(name, version)}; "
            f"ready versions: {listed}"
        )

    def _failed_reason(self, name: str, version: int = 0) -> str:
        for (n, v), error in self._failed.items():
            if n == name and not v:
                return f" (its model directory has a problem: {error})"
            if n == name and version in (0, v):
                return f" (version {v} failed to load: {error})"
        return ""

    def served(self) -> list[ServedModel]:
        return [m for versions in self._served.values() for m in versions.values()]

    def statuses(self) -> list[VersionStatus]:
        rows = [VersionStatus(m.name, m.version, m.state) for m in self.served()]
        rows += [VersionStatus(n, v, LoadState.LOADING) for n, v in self._loading]
        rows += [VersionStatus(n, v, LoadState.FAILED, e) for (n, v), e in self._failed.items()]
        return sorted(rows, key=lambda r: (r.name, r.version))

    def versions_of(self, name: str) -> list[int]:
        return sorted(self._served.get(name, {}))

    # ---- life cycle ----

    async def sync(self) -> None:
        """Scan the repository; load what is new, drain what left. Safe to call repeatedly.

        A version that fails to load does not count for the version policy, so a broken new
        version leaves the one serving before it in place; it is retried when its files change.
        """
        async with self._sync_lock:
            try:
                found, problems = await asyncio.to_thread(scan, self.root)
            except OSError as exc:
                log.error("cannot scan model repository: %s", exc)
                return
            absent = _absent_policy_versions(found)
            for key, error in absent.items():
                problems[key] = f"{problems[key]}; {error}" if key in problems else error
            for key in [k for k in self._failed if k[1] == 0 and k not in problems]:
                del self._failed[key]  # a model-level config problem that was fixed
                self._notify(*key, "unloaded", None)
            for key, error in problems.items():
                if self._failed.get(key) != error:
                    log.error("model %s: %s", key[0], error)
                    if key not in self._failed:  # as version 0: the model as a whole
                        self._notify(*key, "failed", None)
                self._failed[key] = error
            for key in list(self._failed):  # forget failures whose files changed or left
                entry = found.get(key[0])
                now = entry.fingerprints.get(key[1]) if entry else None
                if key[1] and now != self._failed_prints.get(key):
                    del self._failed[key]
                    self._failed_prints.pop(key, None)
                    self._notify(*key, "unloaded", None)  # its "failed" state ends here
            wanted: dict[str, set[int]] = {}
            changed = False  # a version loaded or unloaded
            for name, entry in found.items():
                if entry.policy is None:  # its config is broken: keep serving what it serves
                    wanted[name] = set(self._served.get(name, {}))
                    continue
                while True:
                    usable = [v for v in entry.versions if (name, v) not in self._failed]
                    wanted[name] = set(entry.policy.select(usable))
                    if not wanted[name] and (name, 0) in absent:
                        # It names only versions that are not there: a typo must not take
                        # down what serves (reported as the model's error).
                        wanted[name] = set(self._served.get(name, {}))
                    missing = sorted(v for v in wanted[name] if v not in self._served.get(name, {}))
                    if not missing:
                        break
                    version = missing[-1]
                    if await self._load(name, version, entry.versions[version]):
                        self._loaded_prints[(name, version)] = entry.fingerprints[version]
                        changed = True
                    else:
                        self._failed_prints[(name, version)] = entry.fingerprints[version]
            self._warn_of_changed_files(found)
            for served in self.served():
                leaving = served.version not in wanted.get(served.name, set())
                if leaving and served.state is LoadState.READY:
                    self._drain(served)
                elif not leaving and served.state is LoadState.DRAINING:
                    # Wanted again while its sessions kept it loaded (a rollback): it serves.
                    log.info("model %s version %d is wanted again", served.name, served.version)
                    served.state = LoadState.READY
                    self._notify(served.name, served.version, "ready", None)
            unloaded = await self._unload_drained()
            if unloaded or changed:
                heap.settle(unloaded=bool(unloaded))

    def _warn_of_changed_files(self, found: dict[str, Found]) -> None:
        """A loaded version is not reloaded when its files change (a half-copied file must not
        replace a version that serves), but the change must not pass unnoticed either."""
        for (name, version), loaded in self._loaded_prints.items():
            entry = found.get(name)
            now = entry.fingerprints.get(version) if entry else None
            if now is not None and now != loaded:
                self._loaded_prints[(name, version)] = now  # once per change
                log.warning(
                    "model %s version %d: its files or its model's config.json (other than the "
                    "version policy) changed after it was loaded; a loaded version is not "
                    "reloaded: publish the change as a new version directory",
                    name,
                    version,
                )

    async def _load(self, name: str, version: int, version_dir: Path) -> bool:
        self._loading.add((name, version))
        self._notify(name, version, "loading", None)
        try:
            config = read_config(version_dir.parent, version_dir)
            with self._threads_lock:
                self._threads_loading += 1
            served = await asyncio.to_thread(
                self._counted_load,
                name,
                version,
                version_dir,
                config,
                self.settings,
                self._observer_for(name, version),
            )
        except Exception as exc:  # a broken model never stops the others
            error = f"{type(exc).__name__}: {exc}"
            log.error("model %s version %d failed to load: %s", name, version, error)
            self._failed[(name, version)] = error
            self._notify(name, version, "failed", None)
            return False
        finally:
            self._loading.discard((name, version))
        if self.settings.warmup:
            await served.batcher.warm_up(warm_up_sequences(served))
        self._served.setdefault(name, {})[version] = served
        self._notify(name, version, "ready", served.load_seconds)
        return True

    def _drain(self, served: ServedModel) -> None:
        log.info("model %s version %d leaves service; draining", served.name, served.version)
        served.state = LoadState.DRAINING
        self._notify(served.name, served.version, "draining", None)

    async def _unload_drained(self) -> int:
        """Unload the drained versions that nothing holds any more; returns how many."""
        unloaded = 0
        for served in self.served():
            if served.state is LoadState.DRAINING and not served.sessions:
                if served.batcher.busy:
                    continue  # next sync
                # Out of reach first: nothing may pin it (an ImportSession) while it closes.
                del self._served[served.name][served.version]
                if not self._served[served.name]:
                    del self._served[served.name]
                self._loaded_prints.pop((served.name, served.version), None)
                await served.close()
                log.info("model %s version %d unloaded", served.name, served.version)
                self._notify(served.name, served.version, "unloaded", None)
                unloaded += 1
        return unloaded

    async def watch(self, interval: float) -> None:
        """Re-scan every `interval` seconds until cancelled. A scan that fails is logged and the
        next one runs all the same: hot reload must not stop for good on one bad file."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sync()
            except Exception:
                log.exception("rescanning model repository %s failed; trying again", self.root)

    def _counted_load(self, *args: Any) -> ServedModel:
        try:
            return load_version(*args)
        finally:
            with self._threads_lock:
                self._threads_loading -= 1

    @property
    def threads_loading(self) -> int:
        with self._threads_lock:
            return self._threads_loading

    async def close(self) -> None:
        for served in self.served():
            await served.close()

    def _notify(self, name: str, version: int, event: str, seconds: float | None) -> None:
        if self._listener is not None:
            self._listener(name, version, event, seconds)


def _absent_policy_versions(found: dict[str, Found]) -> dict[tuple[str, int], str]:
    """A model-level error for each version policy that names versions not in the repository."""
    problems = {}
    for name, entry in found.items():
        named = entry.policy.versions if entry.policy else ()
        absent = sorted(set(named) - set(entry.versions))
        if absent:
            problems[(name, 0)] = (
                f"version_policy names versions {absent} that are not in the repository "
                f"(found {sorted(entry.versions)})"
            )
    return problems


def _usable(model: ServedModel, draining_ok: bool) -> bool:
    return model.state is LoadState.READY or (draining_ok and model.state is LoadState.DRAINING)
