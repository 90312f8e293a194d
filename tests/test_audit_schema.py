"""Audit schema versions: ordered migrations bring a new column to an existing database.

SQLite keeps the version in ``PRAGMA user_version``; the PostgreSQL twin of these tests is
in ``test_gateway_postgres.py``.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from safetygame.errors import ConfigError
from safetygame.gateway import audit
from safetygame.gateway.audit import SQLiteAuditStore


def _record(i: int, tenant: str = "t", created: float = 1_700_000_000.0) -> dict[str, Any]:
    return {
        "request_id": f"r{i}",
        "decision_id": f"d{i}",
        "tenant": tenant,
        "created": created,
        "status": "ok",
        "action": "answer",
        "policy_version": "1",
        "policy_digest": "abc",
        "n": i,
    }


# The schema as created before it was versioned (PRAGMA user_version 0).
_UNVERSIONED_SQLITE_SCHEMA = """
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


def _unversioned_sqlite_db(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(_UNVERSIONED_SQLITE_SCHEMA)
    rec = _record(0, created=1_700_000_000.0)
    db.execute(
        "INSERT INTO decisions (request_id, decision_id, tenant, created, status, action,"
        " policy_version, policy_digest, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        ("r0", "d0", "t", rec["created"], "ok", "answer", "1", "abc", json.dumps(rec)),
    )
    db.commit()
    db.close()


async def test_sqlite_migrations_bring_a_new_column_to_an_existing_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.db"
    _unversioned_sqlite_db(path)
    store = SQLiteAuditStore(path)  # the current schema adopts the old table as version 1
    await store.start()
    await store.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone() == (1,)
    # A later release adds a column: opening the existing database adds it once.
    extra = ("ALTER TABLE decisions ADD COLUMN note TEXT",)
    monkeypatch.setattr(audit, "_SQLITE_MIGRATIONS", (*audit._SQLITE_MIGRATIONS, extra))
    for _ in range(2):
        store = SQLiteAuditStore(path)
        await store.start()
        try:
            await store.write(_record(1, created=1_700_000_001.0))
            assert [r["n"] for r in await store.recent("t")] == [1, 0]
        finally:
            await store.close()
    db = sqlite3.connect(path)
    assert "note" in [row[1] for row in db.execute("PRAGMA table_info(decisions)")]
    assert db.execute("PRAGMA user_version").fetchone() == (2,)
    assert db.execute("SELECT COUNT(*) FROM decisions").fetchone() == (2,)


async def test_sqlite_store_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    _unversioned_sqlite_db(path)
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {len(audit._SQLITE_MIGRATIONS) + 1}")
    db.close()
    store = SQLiteAuditStore(path)
    with pytest.raises(ConfigError, match="newer than this safetygame knows"):
        await store.start()
    await store.close()
