"""Content-addressed, on-disk cache of model readings (probe scores, log-likelihoods, samples).

Keys are sha256 over (kind, model id, exact request content), so re-tuning a budget or
re-running a benchmark never re-queries a model, and a changed prompt, wording or model
never hits a stale entry. SQLite in WAL mode: safe for several processes at once.

A cache moves between machines as JSON Lines (:meth:`ScoreCache.export_jsonl`,
:meth:`ScoreCache.import_jsonl`; gzip when the file name ends in ``.gz``): one
``{"key", "kind", "value"}`` object per line. Keys are hashes, so an export holds model
readings and texts but none of the prompts they answered.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import re
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

from safetygame.errors import ConfigError

_KEY = re.compile(r"[0-9a-f]{64}")
_T = TypeVar("_T")


@dataclass
class _Flight:
    """One computation in flight for :meth:`ScoreCache.once` and how many callers wait."""

    task: asyncio.Future[Any]
    waiting: int = 0


def cache_dir() -> Path:
    """``$SAFETYGAME_CACHE_DIR``, else ``$XDG_CACHE_HOME/safetygame``, else ``~/.cache/...``."""
    env = os.environ.get("SAFETYGAME_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "safetygame"


def content_key(kind: str, model_id: str, payload: Any) -> str:
    blob = json.dumps([kind, model_id, payload], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ScoreCache:
    """A small key -> JSON store. ``ScoreCache(None)`` keeps entries in memory only."""

    def __init__(self, path: str | Path | None = "default", *, track: bool = False) -> None:
        if path == "default":
            path = cache_dir() / "scores.sqlite"
        self.path = None if path is None else Path(path)
        self._lock = threading.Lock()
        if self.path is None:
            self._db = sqlite3.connect(":memory:", check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        try:
            if self.path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, kind TEXT, value TEXT)"
            )
            self._db.commit()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            if isinstance(exc, sqlite3.OperationalError):  # locked, read-only, ...: as it is
                raise
            # "file is not a database": e.g. --cache given an export instead of the cache
            raise ConfigError(f"{self.path} is not a score cache (SQLite): {exc}") from exc
        self.hits = 0
        self.misses = 0
        #: with ``track``: the keys this object found or stored (what a run read; see
        #: ``export_jsonl(keys=...)``). Off by default: a long-lived gateway would only grow it.
        self.used: set[str] | None = set() if track else None
        # reads of one key in flight, per event loop (see once())
        self._inflight: dict[tuple[int, str], _Flight] = {}

    async def once(self, key: str, compute: Callable[[], Awaitable[_T]]) -> tuple[_T, bool]:
        """``compute()`` once for concurrent callers of one ``key`` (in one event loop):
        (its result, whether this caller shared another's computation). A decision whose
        candidates repeat a text (a model's stock refusal) then asks the model once, and the
        run stays reproducible from the cache: two concurrent calls would read slightly
        different values (the server's numerics depend on its batch) and store only one.
        A cancelled caller leaves the computation running for the others; when every
        caller is cancelled, it is cancelled too."""
        slot = (id(asyncio.get_running_loop()), key)
        found = self._inflight.get(slot)
        flight = found if found is not None else _Flight(asyncio.ensure_future(compute()))
        if found is None:
            self._inflight[slot] = flight
            flight.task.add_done_callback(lambda _: self._land(slot, flight))
        flight.waiting += 1
        try:
            result: _T = await asyncio.shield(flight.task)
            return result, found is not None
        finally:
            flight.waiting -= 1
            if flight.waiting == 0 and not flight.task.done():  # every caller gave up
                flight.task.cancel()
                self._land(slot, flight)  # a caller arriving now starts afresh

    def _land(self, slot: tuple[int, str], flight: _Flight) -> None:
        """Forget ``flight`` unless a newer one already holds its slot."""
        if self._inflight.get(slot) is flight:
            del self._inflight[slot]

    def get(self, key: str) -> Any | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM entries WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        if self.used is not None:
            self.used.add(key)
        return json.loads(row[0])

    def put(self, key: str, kind: str, value: Any) -> None:
        blob = json.dumps(value)
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO entries (key, kind, value) VALUES (?, ?, ?)",
                (key, kind, blob),
            )
            self._db.commit()
        if self.used is not None:
            self.used.add(key)

    def kinds(self) -> dict[str, int]:
        """Entries per kind."""
        with self._lock:
            rows = self._db.execute("SELECT kind, COUNT(*) FROM entries GROUP BY kind").fetchall()
        return {str(k): int(n) for k, n in rows}

    def export_jsonl(
        self,
        path: str | Path,
        kinds: Iterable[str] | None = None,
        keys: Iterable[str] | None = None,
    ) -> int:
        """Write every entry (of ``kinds``, and among ``keys``, if given) to ``path``;
        returns how many."""
        wanted = None if kinds is None else set(kinds)
        only = None if keys is None else set(keys)
        with self._lock:
            rows = self._db.execute("SELECT key, kind, value FROM entries ORDER BY key").fetchall()
        n = 0
        p = Path(path)
        tmp = p.with_name(p.name + ".tmp")
        try:
            with _open(tmp, "w") as f:
                for key, kind, value in rows:
                    if (wanted is None or kind in wanted) and (only is None or key in only):
                        line = {"key": key, "kind": kind, "value": json.loads(value)}
                        f.write(json.dumps(line, ensure_ascii=False) + "\n")
                        n += 1
        except BaseException:
            tmp.unlink(missing_ok=True)  # a failed export leaves nothing behind
            raise
        tmp.replace(p)  # never a half-written export under the real name
        return n

    def import_jsonl(self, path: str | Path, *, replace: bool = False) -> dict[str, int]:
        """Add the entries of an export; all or nothing. Entries whose key is already here
        are kept as they are unless ``replace``: a run that read them goes on seeing them.
        Returns ``{"read", "added", "kept"}``."""
        p = Path(path)
        rows = []
        try:
            with _open(p, "r") as f:
                for i, line in enumerate(f, start=1):
                    if line.strip():
                        rows.append(_entry(line, f"{p}:{i}"))
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read cache export {p}: {exc}") from exc
        verb = "REPLACE" if replace else "IGNORE"
        with self._lock:
            before = self._db.total_changes
            try:
                self._db.executemany(
                    f"INSERT OR {verb} INTO entries (key, kind, value) VALUES (?, ?, ?)", rows
                )
                self._db.commit()
            except sqlite3.Error:
                self._db.rollback()
                raise
            added = self._db.total_changes - before
        return {"read": len(rows), "added": added, "kept": len(rows) - added}

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _open(path: Path, mode: Literal["r", "w"]) -> IO[str]:
    """Text file, gzip-compressed if the name ends in ``.gz`` (a ``.tmp`` suffix aside)."""
    if not path.name.removesuffix(".tmp").endswith(".gz"):
        return open(path, mode, encoding="utf-8")
    return gzip.open(path, "rt" if mode == "r" else "wt", encoding="utf-8")


def _entry(line: str, where: str) -> tuple[str, str, str]:
    """One export line -> a row, or a ConfigError naming the file and line."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not JSON ({exc.msg})") from exc
    if not isinstance(obj, dict) or set(obj) != {"key", "kind", "value"}:
        raise ConfigError(f'{where}: expected an object with "key", "kind" and "value"')
    key, kind = obj["key"], obj["kind"]
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ConfigError(f"{where}: key must be 64 lowercase hex digits (a sha256)")
    if not isinstance(kind, str) or not kind:
        raise ConfigError(f"{where}: kind must be a non-empty string")
    return key, kind, json.dumps(obj["value"])
