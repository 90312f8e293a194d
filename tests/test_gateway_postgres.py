"""The PostgreSQL audit store against a real PostgreSQL server that this module starts
(Debian's postgresql 15: ``apt-get install -y postgresql``), on a free loopback port, as the
``postgres`` system user. Skipped only when the server binaries are absent outside CI; with
``CI`` set their absence fails the module.
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from safetygame.bench.gateway import start_server_process, stop_server_process, upstream_in_thread
from safetygame.errors import ConfigError
from safetygame.gateway import audit
from safetygame.gateway.audit import PostgresAuditStore, export_records

psycopg = pytest.importorskip("psycopg")

SERVE = [sys.executable, "-c", "from safetygame.cli import main; main()", "serve"]


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the ``postgres`` system user."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    bindir = _pg_bin()
    if bindir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL binaries missing in CI: apt-get install -y postgresql")
        pytest.skip("PostgreSQL server binaries not installed (apt-get install -y postgresql)")
    root = Path(tempfile.mkdtemp(prefix="sg-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    port = _free_port()
    subprocess.run(
        _as_postgres(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
            ]
        ),
        check=True,
        capture_output=True,
    )
    opts = f"-p {port} -h 127.0.0.1 -k {root} -c fsync=on -c max_connections=50"
    subprocess.run(
        _as_postgres(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                opts,
                "-l",
                str(root / "server.log"),
                "-w",
                "-t",
                "60",
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fresh_db(pg_url: str) -> str:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS decisions, schema_version")
    return pg_url


def _record(i: int, tenant: str, created: float) -> dict[str, Any]:
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


async def test_postgres_store_roundtrip_scoping_and_idempotence(fresh_db: str) -> None:
    store = PostgresAuditStore(fresh_db)
    await store.start()
    try:
        await asyncio.gather(
            *(store.write(_record(i, f"t{i % 2}", 1000.0 + i)) for i in range(100))
        )
        await store.write(_record(3, "t1", 1003.0))  # a retried write: ignored
        t1 = await store.recent("t1", limit=500)
        assert sorted(r["n"] for r in t1) == list(range(1, 100, 2))
        assert [r["n"] for r in await store.recent("t0", limit=3)] == [98, 96, 94]
        assert len(await store.recent("t0", limit=500, since=1090.0)) == 5
    finally:
        await store.close()
    exported = list(export_records(fresh_db, since=1095.0))
    assert [r["n"] for r in exported] == [95, 96, 97, 98, 99]
    assert len(list(export_records(fresh_db))) == 100


# The schema as created before it was versioned (no schema_version table).
_UNVERSIONED_PG_SCHEMA = """
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


async def test_postgres_migrations_bring_a_new_column_to_an_existing_database(
    fresh_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute(_UNVERSIONED_PG_SCHEMA)
        conn.execute(
            "INSERT INTO decisions (request_id, decision_id, tenant, created, status, action,"
            " policy_version, policy_digest, record) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                "r0",
                "d0",
                "t0",
                1000.0,
                "ok",
                "answer",
                "1",
                "abc",
                psycopg.types.json.Jsonb(_record(0, "t0", 1000.0)),
            ),
        )
    store = PostgresAuditStore(fresh_db)  # the current schema adopts the old table as version 1
    await store.start()
    await store.close()
    extra = ("ALTER TABLE decisions ADD COLUMN note TEXT",)
    monkeypatch.setattr(audit, "_PG_MIGRATIONS", (*audit._PG_MIGRATIONS, extra))
    for i in (1, 2):  # the second open finds the column there and migrates nothing
        store = PostgresAuditStore(fresh_db)
        await store.start()
        try:
            await store.write(_record(i, "t0", 1000.0 + i))
        finally:
            await store.close()
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        cols = conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'decisions'"
        ).fetchall()
        assert ("note",) in cols
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(2,)]
    assert [r["n"] for r in export_records(fresh_db)] == [0, 1, 2]
    monkeypatch.setattr(audit, "_PG_MIGRATIONS", audit._PG_MIGRATIONS[:1])
    store = PostgresAuditStore(fresh_db)
    with pytest.raises(ConfigError, match="newer than this safetygame knows"):
        await store.start()
    await store.close()


def test_two_gateway_processes_share_one_store(fresh_db: str, tmp_path: Path) -> None:
    """Stateless workers: two processes, one database, no lost or duplicated records."""
    acked: list[str] = []
    lock = threading.Lock()

    def load(url: str, n: int) -> None:
        async def main() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:

                async def one(i: int) -> None:
                    body = {
                        "model": "safetygame",
                        "messages": [{"role": "user", "content": f"q {url} {i}"}],
                    }
                    r = await client.post("/v1/chat/completions", json=body)
                    assert r.status_code == 200, r.text
                    with lock:
                        acked.append(r.headers["x-request-id"])

                await asyncio.gather(*(one(i) for i in range(n)))

        asyncio.run(main())

    with upstream_in_thread(latency=0.01) as up:
        cmd = [
            *SERVE,
            "--upstream",
            up.url,
            "--port",
            "0",
            "--audit",
            fresh_db,
            "--log-level",
            "warning",
        ]
        procs = [start_server_process(cmd, tmp_path / f"gw{i}.log") for i in range(2)]
        try:
            threads = [threading.Thread(target=load, args=(url, 40)) for _, url in procs]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            # Each process serves the other's records too: the store is shared.
            r = httpx.get(f"{procs[0][1]}/v1/safetygame/decisions?limit=500", timeout=30)
            seen = {rec["request_id"] for rec in r.json()["data"]}
        finally:
            for proc, _ in procs:
                stop_server_process(proc)
    assert len(acked) == 80
    stored = [rec["request_id"] for rec in export_records(fresh_db)]
    assert sorted(stored) == sorted(acked)
    assert seen == set(acked)
