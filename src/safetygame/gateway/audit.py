"""The audit log: every decision, durable before its response is sent.

Two stores share one schema and one write path:

- ``SQLiteAuditStore`` (default, ``sqlite:///path``): WAL journal, ``synchronous=FULL``;
- ``PostgresAuditStore`` (``postgresql://...``, psycopg 3): several gateway processes may
  share one database.

``write`` returns only after the record's transaction has committed. Writes are *group
committed*: one writer drains every record waiting and commits them in one transaction, so
under load many requests share one fsync instead of queueing for one each. Records are keyed
by ``request_id`` with insert-or-ignore, so a retried write never duplicates a record.

A record is a JSON object (see ``audit_record``); it holds the conversation and every
candidate, so the store is as sensitive as the traffic itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from safetygame.agent import Decision
from safetygame.errors import ConfigError

MAX_BATCH = 512

_COLUMNS = (
    "request_id",
    "decision_id",
    "tenant",
    "created",
    "status",
    "action",
    "policy_version",
    "policy_digest",
    "record",
)


def audit_record(
    decision: Decision,
    *,
    request_id: str,
    tenant: str,
    model: str,
    stream: bool,
    upstream_s: float,
) -> dict[str, Any]:
    """The stored form of one decision: everything needed to audit it, as JSON values."""
    data = _plain(decision)
    data.pop("id")
    return {
        "request_id": request_id,
        "decision_id": decision.id,
        "tenant": tenant,
        "model": model,
        "stream": stream,
        "upstream_s": upstream_s,
        **data,
    }


def _plain(obj: Any) -> Any:
    """Dataclasses, enums, tuples and numpy scalars -> JSON values; non-finite floats -> None."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, bool | int | str) or obj is None:
        return obj
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return str(obj)


def _row(record: dict[str, Any]) -> tuple[Any, ...]:
    return (
        record["request_id"],
        record["decision_id"],
        record["tenant"],
        float(record["created"]),
        record["status"],
        record["action"],
        record["policy_version"],
        record["policy_digest"],
        json.dumps(record, ensure_ascii=False, allow_nan=False),
    )


class AuditStore(ABC):
    """Durable decision records. ``start`` before use, ``close`` after."""

    url: str

    def __init__(self) -> None:
        self._queue: asyncio.Queue[tuple[dict[str, Any], asyncio.Future[None]]] | None = None
        self._writer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._open()
        self._queue = asyncio.Queue()
        self._writer = asyncio.create_task(self._write_loop(), name="audit-writer")

    async def close(self) -> None:
        if self._writer is not None and self._queue is not None:
            # Let records already queued commit before the writer stops.
            while not self._queue.empty():
                await asyncio.sleep(0.01)
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        await self._close()

    async def write(self, record: dict[str, Any]) -> None:
        """Return once ``record`` is committed; raise if it could not be."""
        if self._queue is None:
            raise RuntimeError("audit store not started")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._queue.put((record, fut))
        await fut

    async def _write_loop(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < MAX_BATCH:
                batch.append(self._queue.get_nowait())
            try:
                await self._write_batch([_row(r) for r, _ in batch])
            except Exception as exc:  # every waiter learns its record was not written
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
            else:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)

    @abstractmethod
    async def _open(self) -> None: ...

    @abstractmethod
    async def _close(self) -> None: ...

    @abstractmethod
    async def _write_batch(self, rows: list[tuple[Any, ...]]) -> None: ...

    @abstractmethod
    async def recent(
        self, tenant: str | None, limit: int = 50, since: float | None = None
    ) -> list[dict[str, Any]]:
        """The newest records (newest first), of one tenant or of all when ``tenant`` is None."""


# -- SQLite ---------------------------------------------------------------------------------

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    decision_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    created REAL NOT NULL,
    status TEXT NOT NULL,
    action TEXT NOT NULL,
    policy_version TEXT NOT NULL,
    policy_digest TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_tenant_seq ON decisions (tenant, seq);
CREATE INDEX IF NOT EXISTS decisions_created ON decisions (created);
"""


def _sqlite_connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, timeout=30, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # WAL + FULL: a committed record survives power loss
    db.execute("PRAGMA busy_timeout=30000")
    return db


class SQLiteAuditStore(AuditStore):
    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self._db: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        # One thread owns every write: commits happen in order, off the event loop.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-sqlite")

    async def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        self._db = await loop.run_in_executor(self._pool, self._open_sync)

    def _open_sync(self) -> sqlite3.Connection:
        db = _sqlite_connect(self.path)
        db.executescript(_SQLITE_SCHEMA)
        return db

    async def _close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.get_running_loop().run_in_executor(self._pool, db.close)
        self._pool.shutdown(wait=True)

    async def _write_batch(self, rows: list[tuple[Any, ...]]) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self._write_sync, rows)

    def _write_sync(self, rows: list[tuple[Any, ...]]) -> None:
        assert self._db is not None
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                f"INSERT OR IGNORE INTO decisions ({', '.join(_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(_COLUMNS))})",
                rows,
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def recent(
        self, tenant: str | None, limit: int = 50, since: float | None = None
    ) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._recent_sync, tenant, limit, since)

    def _recent_sync(
        self, tenant: str | None, limit: int, since: float | None
    ) -> list[dict[str, Any]]:
        sql, args = _select(tenant, since, "?")
        with self._read_lock:
            db = _sqlite_connect(self.path)
            try:
                rows = db.execute(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit)).fetchall()
            finally:
                db.close()
        return [json.loads(r[0]) for r in rows]


def _select(tenant: str | None, since: float | None, ph: str) -> tuple[str, list[Any]]:
    where: list[str] = []
    args: list[Any] = []
    if tenant is not None:
        where.append(f"tenant = {ph}")
        args.append(tenant)
    if since is not None:
        where.append(f"created >= {ph}")
        args.append(since)
    clause = (" WHERE " + " AND ".join(where)) if where else ""
    return f"SELECT record FROM decisions{clause}", args


# -- PostgreSQL -----------------------------------------------------------------------------

_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    seq BIGSERIAL PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    decision_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    status TEXT NOT NULL,
    action TEXT NOT NULL,
    policy_version TEXT NOT NULL,
    policy_digest TEXT NOT NULL,
    record JSONB NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_tenant_seq ON decisions (tenant, seq);
CREATE INDEX IF NOT EXISTS decisions_created ON decisions (created);
"""


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise ConfigError(
            "audit: a postgresql:// URL needs psycopg; install it with: "
            "pip install 'safetygame[gateway]'"
        ) from None
    return psycopg


class PostgresAuditStore(AuditStore):
    """One write connection and one read connection per process; many processes may share
    the database (``request_id`` is unique, inserts ignore conflicts)."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self._pg = _psycopg()
        self._conn: Any = None
        self._read: Any = None
        self._read_lock = asyncio.Lock()

    async def _connect(self) -> Any:
        conn = await self._pg.AsyncConnection.connect(self.url, connect_timeout=10)
        return conn

    async def _open(self) -> None:
        self._conn = await self._connect()
        # Concurrent CREATE IF NOT EXISTS can still race in PostgreSQL: serialise it.
        async with self._conn.transaction():
            await self._conn.execute("SELECT pg_advisory_xact_lock(727274)")
            await self._conn.execute(_PG_SCHEMA)

    async def _close(self) -> None:
        for conn in (self._conn, self._read):
            if conn is not None:
                await conn.close()
        self._conn = self._read = None

    async def _write_batch(self, rows: list[tuple[Any, ...]]) -> None:
        if self._conn is None or self._conn.closed:
            self._conn = await self._connect()
        try:
            async with self._conn.transaction(), self._conn.cursor() as cur:
                await cur.executemany(
                    f"INSERT INTO decisions ({', '.join(_COLUMNS)}) "
                    f"VALUES ({', '.join(['%s'] * len(_COLUMNS))}) "
                    "ON CONFLICT (request_id) DO NOTHING",
                    rows,
                )
        except self._pg.OperationalError:
            # A broken connection: drop it so the next batch reconnects.
            await self._conn.close()
            self._conn = None
            raise

    async def recent(
        self, tenant: str | None, limit: int = 50, since: float | None = None
    ) -> list[dict[str, Any]]:
        sql, args = _select(tenant, since, "%s")
        async with self._read_lock:
            if self._read is None or self._read.closed:
                self._read = await self._connect()
                await self._read.set_autocommit(True)
            cur = await self._read.execute(sql + " ORDER BY seq DESC LIMIT %s", (*args, limit))
            rows = await cur.fetchall()
        return [r[0] if isinstance(r[0], dict) else json.loads(r[0]) for r in rows]


# -- opening and exporting --------------------------------------------------------------------


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///path`` URL (or a bare path), else None."""
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///") :])
    if "://" not in url:
        return Path(url)
    return None


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def open_store(url: str) -> AuditStore:
    """An (unstarted) store for ``sqlite:///path``, a bare path, or ``postgresql://...``."""
    if is_postgres(url):
        return PostgresAuditStore(url)
    path = sqlite_path(url)
    if path is None or not str(path):
        raise ConfigError(f"audit: unsupported URL {url!r}; use sqlite:///PATH or postgresql://...")
    return SQLiteAuditStore(path)


def export_records(url: str, since: float | None = None) -> Iterator[dict[str, Any]]:
    """Every record created at or after ``since`` (epoch seconds), oldest first."""
    sql, args = _select(None, since, "%s" if is_postgres(url) else "?")
    sql += " ORDER BY created, seq"
    if is_postgres(url):
        pg = _psycopg()
        with pg.connect(url, connect_timeout=10) as conn, conn.cursor(name="export") as cur:
            cur.execute(sql, args)
            for (rec,) in cur:
                yield rec if isinstance(rec, dict) else json.loads(rec)
        return
    path = sqlite_path(url)
    if path is None or not path.is_file():
        raise ConfigError(f"audit: no SQLite audit database at {url!r}")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        for (rec,) in db.execute(sql, args):
            yield json.loads(rec)
    finally:
        db.close()
