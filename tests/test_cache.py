"""The score cache: content keys, and moving entries between machines."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from safetygame.cache import ScoreCache, content_key
from safetygame.cli import main
from safetygame.errors import ConfigError


def _filled(path: Path | None) -> ScoreCache:
    c = ScoreCache(path)
    c.put(content_key("yes_no", "m", ["a"]), "yes_no", {"p": 0.25, "method": "logprobs"})
    c.put(content_key("yes_no", "m", ["b"]), "yes_no", {"p": 0.75, "method": "logprobs"})
    c.put(content_key("sample", "m", ["c"]), "sample", [{"text": "Dites « oui ».", "n": 3}])
    return c


@pytest.mark.parametrize("name", ["export.jsonl", "export.jsonl.gz"])
def test_export_then_import_gives_the_same_entries(tmp_path: Path, name: str) -> None:
    src = _filled(tmp_path / "a.sqlite")
    assert src.export_jsonl(tmp_path / name) == 3
    dst = ScoreCache(tmp_path / "b.sqlite")
    assert dst.import_jsonl(tmp_path / name) == {"read": 3, "added": 3, "kept": 0}
    assert dst.kinds() == src.kinds() == {"yes_no": 2, "sample": 1}
    key = content_key("sample", "m", ["c"])
    assert dst.get(key) == src.get(key) == [{"text": "Dites « oui ».", "n": 3}]
    # importing again adds nothing
    assert dst.import_jsonl(tmp_path / name) == {"read": 3, "added": 0, "kept": 3}
    assert not list(tmp_path.glob("*.tmp"))
    if name.endswith(".gz"):  # really compressed, and lines of {"key", "kind", "value"}
        lines = gzip.decompress((tmp_path / name).read_bytes()).decode().splitlines()
        assert {tuple(sorted(json.loads(s))) for s in lines} == {("key", "kind", "value")}


def test_export_of_some_kinds(tmp_path: Path) -> None:
    assert _filled(None).export_jsonl(tmp_path / "e.jsonl", kinds=["sample"]) == 1
    assert ScoreCache(None).import_jsonl(tmp_path / "e.jsonl")["added"] == 1


def test_a_tracking_cache_exports_exactly_what_was_read_or_stored(tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite"
    _filled(path).close()
    c = ScoreCache(path, track=True)
    a, b = (content_key("yes_no", "m", [x]) for x in "ab")
    new = content_key("x", "m", [1])
    assert c.get(a) is not None and c.get(content_key("yes_no", "m", ["absent"])) is None
    c.put(new, "x", 1)
    assert c.used == {a, new}
    assert c.export_jsonl(tmp_path / "used.jsonl", keys=c.used) == 2
    got = ScoreCache(None)
    got.import_jsonl(tmp_path / "used.jsonl")
    assert got.get(a) == {"p": 0.25, "method": "logprobs"} and got.get(new) == 1
    assert got.get(b) is None
    assert ScoreCache(None).used is None  # off by default: a gateway's cache would only grow


def test_import_keeps_what_is_here_unless_replace(tmp_path: Path) -> None:
    key = content_key("yes_no", "m", ["a"])
    other = ScoreCache(None)
    other.put(key, "yes_no", {"p": 0.9, "method": "sampled"})
    other.export_jsonl(tmp_path / "e.jsonl")
    here = _filled(None)
    assert here.import_jsonl(tmp_path / "e.jsonl")["kept"] == 1
    # a run that read 0.25 goes on reading it
    assert here.get(key) == {"p": 0.25, "method": "logprobs"}
    assert here.import_jsonl(tmp_path / "e.jsonl", replace=True)["added"] == 1
    assert here.get(key) == {"p": 0.9, "method": "sampled"}


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("{not json", "not JSON"),
        ('{"key": "ab", "kind": "x", "value": 1}', "64 lowercase hex"),
        ('{"key": "' + "a" * 64 + '", "value": 1}', '"key", "kind" and "value"'),
        ('{"key": "' + "a" * 64 + '", "kind": "", "value": 1}', "kind must be"),
        ("[1, 2]", '"key", "kind" and "value"'),
    ],
)
def test_a_bad_line_names_file_and_line_and_imports_nothing(
    tmp_path: Path, line: str, says: str
) -> None:
    good = json.dumps({"key": "b" * 64, "kind": "yes_no", "value": {"p": 0.5}})
    f = tmp_path / "bad.jsonl"
    f.write_text(f"{good}\n\n{line}\n", encoding="utf-8")
    c = ScoreCache(None)
    with pytest.raises(ConfigError, match=says) as err:
        c.import_jsonl(f)
    assert f"{f}:3" in str(err.value)
    assert len(c) == 0


def test_unreadable_export_is_a_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "e.jsonl.gz"
    f.write_bytes(b"not gzip at all")
    with pytest.raises(ConfigError, match="cannot read cache export"):
        ScoreCache(None).import_jsonl(f)


def test_cli_info_export_import(tmp_path: Path) -> None:
    _filled(tmp_path / "a.sqlite").close()
    run = CliRunner().invoke
    res = run(main, ["cache", "info", "--cache", str(tmp_path / "a.sqlite"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["kinds"] == {"yes_no": 2, "sample": 1}
    exp = tmp_path / "e.jsonl.gz"
    res = run(main, ["cache", "export", str(exp), "--cache", str(tmp_path / "a.sqlite"), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["exported"] == 3
    res = run(main, ["cache", "import", str(exp), "--cache", str(tmp_path / "b.sqlite"), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["added"] == 3
    res = run(main, ["cache", "import", str(exp), "--cache", str(tmp_path / "b.sqlite")])
    assert res.exit_code == 0 and "added 0, kept 3" in res.stdout
    (tmp_path / "bad.jsonl").write_text("oops\n", encoding="utf-8")
    res = run(
        main,
        ["cache", "import", str(tmp_path / "bad.jsonl"), "--cache", str(tmp_path / "c.sqlite")],
    )
    assert res.exit_code == 2 and "bad.jsonl:1: not JSON" in res.stderr
    res = run(main, ["cache", "info", "--cache", str(tmp_path / "none.sqlite")])
    assert res.exit_code == 2 and "no score cache" in res.stderr


@pytest.mark.parametrize(
    "export", sorted((Path(__file__).parents[1] / "resume").glob("*.jsonl.gz")), ids=str
)
def test_committed_exports_import_whole(export: Path) -> None:
    """Every export under resume/ is well formed and holds only this cache's kinds."""
    c = ScoreCache(None)
    got = c.import_jsonl(export)
    assert got["read"] == got["added"] > 0
    assert set(c.kinds()) <= {"yes_no", "sample", "loglik", "embed", "hidden"}


def test_a_failed_export_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails half-way (here the second line) leaves neither a .tmp nor the file,
    and an export already at the target is kept."""
    target = tmp_path / "e.jsonl.gz"
    target.write_bytes(b"earlier export")
    real_dumps = json.dumps
    calls: list[int] = []

    def failing_dumps(obj: object, **kw: Any) -> str:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_dumps(obj, **kw)

    c = _filled(None)
    monkeypatch.setattr("safetygame.cache.json.dumps", failing_dumps)
    with pytest.raises(OSError, match="disk full"):
        c.export_jsonl(target)
    assert target.read_bytes() == b"earlier export"
    assert not list(tmp_path.glob("*.tmp"))


def test_a_file_that_is_not_a_cache_is_a_clear_error(tmp_path: Path) -> None:
    export = tmp_path / "e.jsonl.gz"
    _filled(None).export_jsonl(export)
    before = export.read_bytes()
    with pytest.raises(ConfigError, match="is not a score cache"):
        ScoreCache(export)
    res = CliRunner().invoke(main, ["cache", "info", "--cache", str(export)])
    assert res.exit_code == 2 and "is not a score cache" in res.stderr
    assert export.read_bytes() == before  # untouched


def test_once_shares_one_computation_and_cancels_it_when_every_caller_leaves() -> None:
    import asyncio

    cache = ScoreCache(None)
    calls: list[str] = []

    async def compute() -> str:
        calls.append("go")
        await asyncio.sleep(0.05)
        return "value"

    async def both() -> list[tuple[str, bool]]:
        return list(await asyncio.gather(cache.once("k", compute), cache.once("k", compute)))

    assert asyncio.run(both()) == [("value", False), ("value", True)] and calls == ["go"]

    finished: list[str] = []

    async def slow() -> str:
        await asyncio.sleep(0.2)
        finished.append("done")
        return "late"

    async def abandon() -> None:
        waiters = [asyncio.ensure_future(cache.once("j", slow)) for _ in range(2)]
        await asyncio.sleep(0.01)
        waiters[0].cancel()  # one caller leaves: the other still gets the value
        assert await waiters[1] == ("late", True)
        third = asyncio.ensure_future(cache.once("i", slow))
        await asyncio.sleep(0.01)
        third.cancel()  # the only caller leaves: the computation stops
        await asyncio.sleep(0.3)

    asyncio.run(abandon())
    assert finished == ["done"]

    async def leave_and_return() -> tuple[str, bool]:
        first = asyncio.ensure_future(cache.once("h", slow))
        await asyncio.sleep(0.01)
        first.cancel()
        await asyncio.sleep(0)  # the abandoned computation is being cancelled
        return await cache.once("h", slow)  # a new caller starts afresh, not on the cancelled one

    assert asyncio.run(leave_and_return()) == ("late", False)
