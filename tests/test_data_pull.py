"""``safetygame data pull`` / ``data list`` against a real HTTP server on loopback.

The server (``http.server`` in a thread, with ``Range`` support) serves a copy of the
project's offline data folder, laid out as a mirror: ``<base>/<benchmark>/<file>``. It can cut
a response short on purpose (an interrupted transfer) and its copy can be altered (a checksum
mismatch). No mocks, no external network.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
from click.testing import CliRunner

from safetygame.cli import main
from safetygame.errors import ConfigError, DataUnavailableError
from safetygame.eval import datasets as ds
from safetygame.eval.download import pull, resolve_names, source_url, status
from safetygame.eval.sources import MIRROR_ENV, SOURCES, is_complete, pulled_root
from safetygame.models import file_sha256


class _DataServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.cut_after: dict[str, int] = {}  # path -> bytes to send before hanging up (once)
        self.ranges = True  # False: ignore Range headers (answer 200 with the whole file)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/mirror"


class _Handler(BaseHTTPRequestHandler):
    server: _DataServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append((self.path, rng))
        rel = unquote(self.path).removeprefix("/mirror/")
        file = srv.root / rel
        if ".." in rel or not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        start, code = 0, 200
        if rng is not None and srv.ranges:
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            assert m is not None, rng
            start, code = int(m[1]), 206
            if start >= len(data):
                self.send_error(416)
                return
        body = data[start:]
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        cut = srv.cut_after.pop(rel, None)
        if cut is None:
            self.wfile.write(body)
            return
        self.wfile.write(body[:cut])  # then hang up mid-body
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def mirror(tmp_path: Path, benchmark_data: Path) -> Iterator[_DataServer]:
    """A copy of the data folder (only the pinned files) served on loopback."""
    shared = benchmark_data
    copy = tmp_path / "served"
    for name, bench in SOURCES.items():
        for f in bench.files:
            (copy / name / f.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shared / name / f.path, copy / name / f.path)
    srv = _DataServer(copy)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def cache(benchmark_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh user cache; no data or mirror settings from the environment (the shared data
    folder is resolved before they change)."""
    monkeypatch.setenv("SAFETYGAME_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(ds.DATA_ENV, raising=False)
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    return tmp_path / "cache"


# --------------------------------------------------------------------------- the pins


def test_pins_match_the_offline_copies(benchmark_data: Path) -> None:
    """Every pinned size and sha256 is that of the official file in the shared folder."""
    shared = benchmark_data
    for name, bench in SOURCES.items():
        assert bench.files, name
        for f in bench.files:
            p = shared / name / f.path
            assert p.stat().st_size == f.size, p
            assert file_sha256(p) == f.sha256, p
            assert f.url.startswith("https://"), f.url
    assert set(ds.BENCHMARKS) <= set(SOURCES)  # every loader's data can be pulled


def test_names_and_urls() -> None:
    assert resolve_names([]) == resolve_names(["all"]) == list(SOURCES)
    assert resolve_names(["xstest", "hhh"]) == ["hhh", "xstest"]  # registry order
    with pytest.raises(ConfigError, match=r"unknown benchmark.*nope"):
        resolve_names(["nope"])
    bench = SOURCES["hhh"]
    f = bench.files[1]
    assert source_url(bench, f) == f.url
    assert source_url(bench, f, "http://m.example/data/") == (
        "http://m.example/data/hhh/harmless/task.json"
    )
    with pytest.raises(ConfigError, match="mirror must be an http"):
        source_url(bench, f, "/some/folder")


# --------------------------------------------------------------------------- pulling


def test_fresh_pull_then_loaders_read_it(mirror: _DataServer, cache: Path) -> None:
    results = pull(["hhh", "xstest"], mirror=mirror.url)
    assert [r.benchmark for r in results] == ["hhh", "xstest"]
    for r in results:
        assert r.folder == cache / "data" / r.benchmark
        for f in r.files:
            assert f.action == "downloaded" and f.fetched == f.size
            assert (
                f.path.read_bytes()
                == (mirror.root / r.benchmark / f.path.relative_to(r.folder)).read_bytes()
            )
    assert not list((cache / "data").rglob("*.part"))
    # The loaders now read the pulled copy; the rest still comes from the shared folder.
    assert ds.benchmark_dir("hhh") == cache / "data" / "hhh"
    assert len(ds.load("hhh")) == 221 and len(ds.load("xstest")) == 450
    assert ds.benchmark_dir("advbench") != cache / "data" / "advbench"
    assert len(ds.load("advbench")) == 520
    assert ds.data_root() == pulled_root()
    # A second pull finds verified copies and fetches nothing.
    before = len(mirror.requests)
    again = pull(["hhh", "xstest"], mirror=mirror.url)
    assert {f.action for r in again for f in r.files} == {"present"}
    assert len(mirror.requests) == before


def test_env_var_beats_the_pulled_copy(
    mirror: _DataServer, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pull(["xstest"], mirror=mirror.url)
    own = tmp_path / "own"
    shutil.copytree(mirror.root / "xstest", own / "xstest")
    monkeypatch.setenv(ds.DATA_ENV, str(own))
    assert ds.benchmark_dir("xstest") == own / "xstest"
    assert ds.data_root() == own


def test_resume_after_an_interrupted_transfer(mirror: _DataServer, cache: Path) -> None:
    rel = "hhh/honest/task.json"
    size = (mirror.root / rel).stat().st_size
    mirror.cut_after[rel] = 30_000
    with pytest.raises(DataUnavailableError, match=r"interrupted.*run the command again") as exc:
        pull(["hhh"], mirror=mirror.url, retries=0)
    assert f"{mirror.url}/{rel}" in str(exc.value)
    dest = cache / "data" / rel
    part = dest.with_name("task.json.part")
    assert not dest.exists() and part.stat().st_size == 30_000
    assert not is_complete(cache / "data", "hhh")
    # The next run asks for the rest only and finishes the file.
    results = pull(["hhh"], mirror=mirror.url)
    honest = next(f for f in results[0].files if f.path == dest)
    assert honest.action == "resumed" and honest.fetched == size - 30_000
    assert (f"/mirror/{rel}", "bytes=30000-") in mirror.requests
    assert file_sha256(dest) == honest.sha256 and not part.exists()
    assert is_complete(cache / "data", "hhh")


def test_an_interruption_is_resumed_within_the_run(mirror: _DataServer, cache: Path) -> None:
    rel = "safetybench/test_zh_subset.json"
    mirror.cut_after[rel] = 100_000
    (result,) = pull(["safetybench"], mirror=mirror.url, retries=2)
    f = next(f for f in result.files if f.path.name == "test_zh_subset.json")
    assert f.action == "resumed" and f.fetched == f.size  # 100,000 + the rest
    assert (f"/mirror/{rel}", "bytes=100000-") in mirror.requests
    assert len(ds.load("safetybench")) == 2100


def test_a_server_without_range_support_starts_over(mirror: _DataServer, cache: Path) -> None:
    mirror.ranges = False
    mirror.cut_after["xstest/xstest_prompts.csv"] = 20_000
    (result,) = pull(["xstest"], mirror=mirror.url, retries=1)
    (f,) = result.files
    assert f.action == "downloaded" and f.fetched == 20_000 + f.size
    assert file_sha256(f.path) == f.sha256


def test_checksum_mismatch_keeps_the_good_file(mirror: _DataServer, cache: Path) -> None:
    pull(["xstest"], mirror=mirror.url)
    dest = cache / "data" / "xstest" / "xstest_prompts.csv"
    good = dest.read_bytes()
    served = mirror.root / "xstest" / "xstest_prompts.csv"
    served.write_bytes(good.replace(b"kill", b"hug!"))  # same size, other content
    with pytest.raises(DataUnavailableError) as exc:
        pull(["xstest"], mirror=mirror.url, force=True)
    msg = str(exc.value)
    assert "checksum mismatch" in msg
    assert f"{mirror.url}/xstest/xstest_prompts.csv" in msg
    assert SOURCES["xstest"].files[0].sha256 in msg and "SAFETYGAME_DATA" in msg
    assert dest.read_bytes() == good  # the verified copy stays
    assert not dest.with_name("xstest_prompts.csv.part").exists()
    # A bad file never takes the name, even with no good copy to protect.
    shutil.rmtree(cache / "data" / "xstest")
    with pytest.raises(DataUnavailableError, match="checksum mismatch"):
        pull(["xstest"], mirror=mirror.url)
    assert not (cache / "data" / "xstest" / "xstest_prompts.csv").exists()


def test_a_longer_file_is_stopped_at_the_pinned_size(mirror: _DataServer, cache: Path) -> None:
    served = mirror.root / "advbench" / "harmful_strings.csv"
    served.write_bytes(served.read_bytes() + b"extra,row\n")
    with pytest.raises(DataUnavailableError, match="more than the pinned 34654 bytes"):
        pull(["advbench"], mirror=mirror.url)
    assert not list((cache / "data" / "advbench").glob("harmful_strings.csv*"))


def test_unreachable_server(cache: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/data"
    with pytest.raises(DataUnavailableError, match="cannot reach the server") as exc:
        pull(["xstest"], mirror=url, timeout=5)
    msg = str(exc.value)
    assert f"{url}/xstest/xstest_prompts.csv" in msg
    assert SOURCES["xstest"].files[0].sha256 in msg and "SAFETYGAME_DATA" in msg
    assert not (cache / "data" / "xstest" / "xstest_prompts.csv").exists()


# --------------------------------------------------------------------------- the CLI


def test_cli_pull_and_list(
    mirror: _DataServer, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    before = json.loads(runner.invoke(main, ["data", "list", "--json"]).output)
    assert before["root"] == str(cache / "data")
    rows = {b["name"]: b for b in before["benchmarks"]}
    assert set(rows) == set(SOURCES)
    assert rows["hhh"]["pulled"] == "absent" and rows["hhh"]["used_from"] == "shared"

    monkeypatch.setenv(MIRROR_ENV, mirror.url)  # the mirror setting, as a user would give it
    out = runner.invoke(main, ["data", "pull", "hhh", "advbench", "--json"])
    assert out.exit_code == 0, out.output
    pulled = json.loads(out.output)
    assert [b["benchmark"] for b in pulled["benchmarks"]] == ["hhh", "advbench"]
    assert {f["action"] for b in pulled["benchmarks"] for f in b["files"]} == {"downloaded"}

    after = {
        b["name"]: b
        for b in json.loads(runner.invoke(main, ["data", "list", "--json"]).output)["benchmarks"]
    }
    assert after["hhh"]["pulled"] == "complete" and after["hhh"]["files_ok"] == 5
    assert after["hhh"]["used_from"] == "pull"
    assert after["hhh"]["used"] == str(cache / "data" / "hhh")
    assert after["xstest"]["pulled"] == "absent"
    text = runner.invoke(main, ["data", "list"]).output
    assert re.search(r"^hhh\s+complete \(5/5\)", text, re.M)

    # A corrupted pulled file shows up as such.
    (cache / "data" / "advbench" / "harmful_strings.csv").write_text("goal\n")
    rows2 = status(["advbench"])
    assert rows2[0].pulled == "corrupt" and rows2[0].files_ok == 1

    monkeypatch.setenv(MIRROR_ENV, "http://127.0.0.1:9/nothing")
    bad = runner.invoke(main, ["data", "pull", "xstest", "--no-progress"])
    assert bad.exit_code == 1
    assert "error: xstest/xstest_prompts.csv: cannot reach the server" in bad.output
    assert "SAFETYGAME_DATA" in bad.output
