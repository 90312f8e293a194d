"""The audit log: every decision, durable before its response is sent.

Two stores share one schema and one write path:

- ``SQLiteAuditStore`` (default, ``sqlite:///path``): WAL journal, ``synchronous=FULL``;
- ``PostgresAuditStore`` (``postgresql://...``, psycopg 3): several gateway processes may
  share one database.

``write`` returns only after the record's transaction has committed. Writes are *group
committed*: one writer thread drains every record waiting and commits them in one
transaction, so under load many requests share one fsync instead of queueing for one each.
Records are keyed by ``request_id`` with insert-or-ignore, so a retried write never
duplicates a record.

A record is a JSON object (see ``audit_record``); it holds the conversation and every
candidate, so the store is as sensitive as the traffic itself. ``moderation_record`` is the
other kind: a ``POST /v1/moderations`` verdict (``"kind": "moderation"``, action ``flag`` or
``allow``, the texts and their scores); chat records carry no ``kind``.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from safetygame._json import to_jsonable
from safetygame.agent import Decision
from safetygame.errors import ConfigError
from safetygame.gateway.moderation import Moderation
from safetygame.policy import Policy

#: where decisions go when no --audit / audit_url is given
DEFAULT_AUDIT_URL = "sqlite:///safetygame-audit.sqlite3"

MAX_BATCH = 512  # records per commit: 9 x 512 bound parameters, under SQLite's 32,766

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
    data = to_jsonable(decision)
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


def moderation_record(
    outcome: Moderation,
    texts: list[str],
    *,
    request_id: str,
    tenant: str,
    model: str,
    policy: Policy,
    upstream_s: float,
) -> dict[str, Any]:
    """The stored form of one moderation verdict (``safetygame.gateway.moderation``)."""
    return {
        "kind": "moderation",
        "request_id": request_id,
        "decision_id": request_id,
        "tenant": tenant,
        "created": time.time(),
        "status": outcome.status,
        "action": "flag" if outcome.flagged else "allow",
        "model": model,
        "inputs": texts,
        "results": to_jsonable(outcome.results),
        "budget": outcome.budget,
        "reference_scores": outcome.reference,
        "scorer": outcome.scorer,
        "relative": outcome.relative,
        "elapsed_s": outcome.elapsed_s,
        "upstream_s": upstream_s,
        "policy_id": policy.id,
        "policy_version": policy.version,
        "policy_digest": policy.digest,
    }


def _insert_sql(verb: str, ph: str, n: int, tail: str) -> str:
    """``verb`` INTO decisions with ``n`` rows of placeholders ``ph`` in one VALUES list."""
    one = "(" + ", ".join([ph] * len(_COLUMNS)) + ")"
    return f"{verb} INTO decisions ({', '.join(_COLUMNS)}) VALUES {', '.join([one] * n)}{tail}"


def _flat(rows: list[tuple[Any, ...]]) -> list[Any]:
    return [v for row in rows for v in row]


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


_Pending = tuple[dict[str, Any], "asyncio.Future[None]"]  # a record and its waiter


class AuditStore(ABC):
    """Durable decision records. ``start`` before use, ``close`` after.

    One writer thread per store owns the write connection: ``write`` hands the record to it
    without an event-loop round trip, the thread serialises and commits everything waiting
    in one transaction, and wakes all of that batch's waiters with one callback. Encoding
    and the commit's I/O stay off the event loop."""

    url: str

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._read_lock = threading.Lock()  # one reader at a time (``_recent``)
        # Written by the writer thread, read by ``health`` (single assignments: no lock).
        self._busy_since: float | None = None  # monotonic start of the commit under way
        self._batch = 0  # records in that commit
        self._last_error: str | None = None  # class of the last failure, None after a success

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._open)
        self._thread = threading.Thread(target=self._write_loop, name="audit-writer", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)  # after every record already queued
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        await asyncio.to_thread(self._close)

    def health(self, stall_after: float) -> dict[str, Any]:
        """The store's state: ``ok``; ``down`` (not started or its writer died); ``stalled``
        (a commit has been under way for more than ``stall_after`` seconds: a locked or
        unreachable database); ``failing`` (the last commit failed). ``pending``: records
        waiting for a commit. No paths, URLs or error messages (``/healthz`` is public)."""
        busy_since = self._busy_since
        pending = self._queue.qsize() + (self._batch if busy_since is not None else 0)
        if self._thread is None or not self._thread.is_alive():
            state = "down"
        elif busy_since is not None and time.monotonic() - busy_since > stall_after:
            state = "stalled"
        elif self._last_error is not None:
            state = "failing"
        else:
            state = "ok"
        return {"state": state, "pending": pending, "last_error": self._last_error}

    async def write(self, record: dict[str, Any]) -> None:
        """Return once ``record`` is committed; raise if it could not be. A write that is
        cancelled (the request's deadline passed) before the writer takes it is dropped."""
        if self._thread is None or self._loop is None:
            raise RuntimeError("audit store not started")
        fut: asyncio.Future[None] = self._loop.create_future()
        self._queue.put((record, fut))
        await fut

    def _write_loop(self) -> None:
        assert self._loop is not None
        stop = False
        while not stop:
            item = self._queue.get()
            batch: list[_Pending] = []
            while item is not None:
                if not item[1].cancelled():  # nobody waits for it: nothing was sent
                    batch.append(item)
                if len(batch) >= MAX_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            stop = item is None
            if not batch:
                continue
            error: BaseException | None = None
            self._batch, self._busy_since = len(batch), time.monotonic()
            try:
                self._write_rows([_row(r) for r, _ in batch])
            except Exception as exc:  # every waiter learns its record was not written
                error = exc
            self._busy_since = None
            self._last_error = None if error is None else type(error).__name__
            try:
                self._loop.call_soon_threadsafe(_settle, [f for _, f in batch], error)
            except RuntimeError:  # the loop is gone: nobody is waiting any more
                return

    @abstractmethod
    def _open(self) -> None:
        """Open the write connection and create the schema (runs in a worker thread)."""

    @abstractmethod
    def _close(self) -> None: ...

    @abstractmethod
    def _write_rows(self, rows: list[tuple[Any, ...]]) -> None:
        """Insert ``rows`` in one committed transaction (runs in the writer thread)."""

    async def recent(
        self, tenant: str | None, limit: int = 50, since: float | None = None
    ) -> list[dict[str, Any]]:
        """The newest records (newest first), of one tenant or of all when ``tenant`` is None."""
        records, _ = await self.recent_page(tenant, limit, since)
        return records

    async def recent_page(
        self,
        tenant: str | None,
        limit: int = 50,
        since: float | None = None,
        max_bytes: int | None = None,
    ) -> tuple[list[dict[str, Any]], bool]:
        """Like ``recent``, but stops before the records' JSON passes ``max_bytes`` (UTF-8);
        the flag says whether it stopped early (more records would have matched)."""
        return await asyncio.to_thread(self._recent, tenant, limit, since, max_bytes)

    @abstractmethod
    def _recent(
        self, tenant: str | None, limit: int, since: float | None, max_bytes: int | None
    ) -> tuple[list[dict[str, Any]], bool]: ...


def _settle(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for fut in futures:
        if fut.done():  # the waiter was cancelled
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


# -- SQLite ---------------------------------------------------------------------------------

# Migration i (1-based) takes a database from schema version i - 1 to i; the version is
# the file's ``PRAGMA user_version``. A database from before versioning (version 0) already
# has version 1's table, which migration 1 (IF NOT EXISTS) adopts as it is. To add a column,
# append a migration here and in ``_PG_MIGRATIONS`` (and write it in ``_COLUMNS``/``_row``).
_SQLITE_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE IF NOT EXISTS decisions (
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
        )""",
        "CREATE INDEX IF NOT EXISTS decisions_tenant_seq ON decisions (tenant, seq)",
        "CREATE INDEX IF NOT EXISTS decisions_created ON decisions (created)",
    ),
)


def _check_version(version: int, known: int) -> None:
    # A newer schema may mean records this code would write incompletely: refuse to start.
    if version > known:
        raise ConfigError(
            f"audit: the database has schema version {version}, newer than this safetygame "
            f"knows ({known}); upgrade safetygame to use it"
        )


def _migrate_sqlite(db: sqlite3.Connection) -> None:
    """Bring the schema to the newest version, in one transaction (concurrent openers wait)."""
    migrations = _SQLITE_MIGRATIONS
    db.execute("BEGIN IMMEDIATE")
    try:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        _check_version(version, len(migrations))
        for v in range(version, len(migrations)):
            for statement in migrations[v]:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {v + 1}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


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

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = _sqlite_connect(self.path)
        try:
            _migrate_sqlite(db)
        except BaseException:
            db.close()
            raise
        self._db = db

    def _close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            db.close()

    def _write_rows(self, rows: list[tuple[Any, ...]]) -> None:
        assert self._db is not None
        # One statement in autocommit mode is one atomic transaction, and one trip through
        # sqlite3 (one release and re-take of the GIL, which the busy event loop holds most
        # of the time) instead of one per row plus BEGIN and COMMIT.
        self._db.execute(_insert_sql("INSERT OR IGNORE", "?", len(rows), ""), _flat(rows))

    def _recent(
        self, tenant: str | None, limit: int, since: float | None, max_bytes: int | None
    ) -> tuple[list[dict[str, Any]], bool]:
        sql, args = _select(tenant, since, "?")
        with self._read_lock:
            db = _sqlite_connect(self.path)
            try:
                cursor = db.execute(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit))
                texts, truncated = _take(cursor, max_bytes)
            finally:
                db.close()
        return [json.loads(t) for t in texts], truncated


def _take(rows: Iterable[tuple[Any, ...]], max_bytes: int | None) -> tuple[list[Any], bool]:
    """The first column of ``rows`` until their JSON would pass ``max_bytes`` (None: all).
    Rows are read one at a time, so a capped page never holds more than the cap."""
    out: list[Any] = []
    size = 0
    for (value,) in rows:
        if max_bytes is not None:
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            size += len(text.encode("utf-8")) + 1
            if size > max_bytes:
                return out, True
        out.append(value)
    return out, False


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

# As ``_SQLITE_MIGRATIONS``; the version is the one row of the ``schema_version`` table.
_PG_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE IF NOT EXISTS decisions (
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
        )""",
        "CREATE INDEX IF NOT EXISTS decisions_tenant_seq ON decisions (tenant, seq)",
        "CREATE INDEX IF NOT EXISTS decisions_created ON decisions (created)",
    ),
)


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
    """One write connection (the writer thread's) and one read connection per process; many
    processes may share the database (``request_id`` is unique, inserts ignore conflicts)."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self._pg = _psycopg()
        self._conn: Any = None
        self._read: Any = None

    def _connect(self) -> Any:
        return self._pg.connect(self.url, connect_timeout=10, autocommit=True)

    def _open(self) -> None:
        self._conn = self._connect()
        migrations = _PG_MIGRATIONS
        # Concurrent CREATE IF NOT EXISTS can still race in PostgreSQL: serialise it. DDL is
        # transactional here, so a failed migration leaves the previous version intact.
        with self._conn.transaction():
            self._conn.execute("SELECT pg_advisory_xact_lock(727274)")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
            )
            (found,) = self._conn.execute("SELECT max(version) FROM schema_version").fetchone()
            version = 0 if found is None else int(found)
            _check_version(version, len(migrations))
            for v in range(version, len(migrations)):
                for statement in migrations[v]:
                    self._conn.execute(statement)
            if version < len(migrations):
                self._conn.execute("DELETE FROM schema_version")
                self._conn.execute(
                    "INSERT INTO schema_version (version) VALUES (%s)", (len(migrations),)
                )

    def _close(self) -> None:
        for conn in (self._conn, self._read):
            if conn is not None:
                conn.close()
        self._conn = self._read = None

    def _write_rows(self, rows: list[tuple[Any, ...]]) -> None:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        try:
            # One multi-row statement in autocommit mode: one round trip, atomic.
            sql = _insert_sql("INSERT", "%s", len(rows), " ON CONFLICT (request_id) DO NOTHING")
            self._conn.execute(sql, _flat(rows))
        except self._pg.OperationalError:
            # A broken connection: drop it so the next batch reconnects.
            self._conn.close()
            self._conn = None
            raise

    def _recent(
        self, tenant: str | None, limit: int, since: float | None, max_bytes: int | None
    ) -> tuple[list[dict[str, Any]], bool]:
        sql, args = _select(tenant, since, "%s")
        with self._read_lock:
            if self._read is None or self._read.closed:
                self._read = self._connect()
            cur = self._read.execute(sql + " ORDER BY seq DESC LIMIT %s", (*args, limit))
            values, truncated = _take(cur, max_bytes)
        return [v if isinstance(v, dict) else json.loads(v) for v in values], truncated


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
