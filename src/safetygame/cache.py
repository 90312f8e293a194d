"""Content-addressed, on-disk cache of model readings (probe scores, log-likelihoods, samples).

Keys are sha256 over (kind, model id, exact request content), so re-tuning a budget or
re-running a benchmark never re-queries a model, and a changed prompt, wording or model
never hits a stale entry. SQLite in WAL mode: safe for several processes at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any


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

    def __init__(self, path: str | Path | None = "default") -> None:
        if path == "default":
            path = cache_dir() / "scores.sqlite"
        self.path = None if path is None else Path(path)
        self._lock = threading.Lock()
        if self.path is None:
            self._db = sqlite3.connect(":memory:", check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, kind TEXT, value TEXT)"
        )
        self._db.commit()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Any | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM entries WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return json.loads(row[0])

    def put(self, key: str, kind: str, value: Any) -> None:
        blob = json.dumps(value)
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO entries (key, kind, value) VALUES (?, ?, ?)",
                (key, kind, blob),
            )
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
