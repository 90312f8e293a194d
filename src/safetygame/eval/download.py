"""``safetygame data pull`` / ``data list``: the benchmarks' official files in the user cache.

:func:`pull` downloads each file of :data:`~safetygame.eval.sources.SOURCES` into
:func:`~safetygame.eval.sources.pulled_root` (``<cache dir>/data/<benchmark>/<path>``):

- into ``<file>.part`` first; an interrupted transfer is resumed with an HTTP ``Range``
  request (in the same run up to ``retries`` times, else by the next run);
- the ``.part`` file takes the real name only once its size and sha256 match the pins, so a
  partial or bad download never replaces a good file;
- a file already present with the pinned sha256 is not fetched again (``force`` re-fetches
  it, and a failed re-fetch keeps it).

Every failure is a :class:`~safetygame.errors.DataUnavailableError` naming the URL, the
expected sha256 and the alternative (``$SAFETYGAME_DATA`` pointing at a copy of the data).
``mirror`` (or ``$SAFETYGAME_DATA_MIRROR``) replaces the upstream URLs with
``<mirror>/<benchmark>/<path>``: any HTTP server holding a copy of a data folder.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import httpx

from safetygame.errors import ConfigError, DataUnavailableError
from safetygame.eval.datasets import DATA_ENV, benchmark_dir
from safetygame.eval.sources import MIRROR_ENV, SOURCES, Benchmark, SourceFile, pulled_root
from safetygame.models import file_sha256

__all__ = [
    "BenchmarkStatus",
    "FileResult",
    "PullResult",
    "pull",
    "resolve_names",
    "source_url",
    "status",
]

Action = Literal["present", "downloaded", "resumed"]
UsedFrom = Literal["SAFETYGAME_DATA", "pull", "shared", "none"]


@dataclass(frozen=True)
class FileResult:
    """One file after a pull. ``fetched``: bytes received in this run (0 when present)."""

    path: Path
    url: str
    sha256: str
    size: int
    action: Action
    fetched: int


@dataclass(frozen=True)
class PullResult:
    benchmark: str
    folder: Path
    files: tuple[FileResult, ...]


@dataclass(frozen=True)
class BenchmarkStatus:
    """What ``data list`` shows for one benchmark.

    ``pulled``: the state of its files in the pull folder (``complete``: every file there
    with its pinned sha256; ``partial``: some; ``corrupt``: a file with the wrong sha256;
    ``absent``). ``used``: the folder the loaders read (None when no folder holds it) and
    ``used_from`` where that folder comes from.
    """

    name: str
    upstream: str
    license: str
    size: int
    files: int
    files_ok: int
    pulled: Literal["complete", "partial", "corrupt", "absent"]
    pulled_dir: Path
    used: Path | None
    used_from: UsedFrom


def resolve_names(names: Iterable[str]) -> list[str]:
    """Benchmark names in registry order; no names or ``all`` means every benchmark."""
    wanted = list(names)
    if not wanted or "all" in wanted:
        return list(SOURCES)
    unknown = [n for n in wanted if n not in SOURCES]
    if unknown:
        raise ConfigError(
            f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(SOURCES)} (or all)"
        )
    return [n for n in SOURCES if n in wanted]


def _mirror(mirror: str | None) -> str | None:
    m = mirror if mirror is not None else os.environ.get(MIRROR_ENV) or None
    if m is None:
        return None
    if not m.startswith(("http://", "https://")):
        raise ConfigError(f"data mirror must be an http:// or https:// URL, not {m!r}")
    return m.rstrip("/")


def source_url(bench: Benchmark, file: SourceFile, mirror: str | None = None) -> str:
    """The URL ``file`` is fetched from: the pinned upstream URL, or its place on a mirror."""
    m = _mirror(mirror)
    if m is None:
        return file.url
    return f"{m}/{quote(bench.name)}/{quote(file.path)}"


def _unavailable(bench: Benchmark, file: SourceFile, url: str, why: str) -> DataUnavailableError:
    return DataUnavailableError(
        f"{bench.name}/{file.path}: {why}. URL: {url}; expected sha256 {file.sha256} "
        f"({file.size} bytes). To use a copy you already have, set {DATA_ENV} to the folder "
        f"holding {bench.name}/ (or {MIRROR_ENV} to an HTTP server with a copy)."
    )


class _Interrupted(Exception):
    """The transfer stopped before the end; the .part file keeps what arrived."""

    def __init__(self, message: str, received: int = 0) -> None:
        super().__init__(message)
        self.received = received


def _transfer(
    client: httpx.Client, url: str, part: Path, file: SourceFile, bar: Any
) -> tuple[int, bool]:
    """Append the rest of ``url`` to ``part``; returns (bytes received, resumed)."""
    have = part.stat().st_size if part.exists() else 0
    if have > file.size:  # not a prefix of the pinned file
        part.unlink()
        have = 0
    if have == file.size:
        if file_sha256(part) == file.sha256:
            return 0, False  # a finished transfer that was not verified yet
        part.unlink()  # a stale or bad .part: start over
        have = 0
    # Identity encoding: the bytes on the wire are the file's, so a Range offset is a file
    # offset, and every byte that arrived is written (iter_raw) before an interruption.
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    received = 0
    try:
        with client.stream("GET", url, headers=headers) as r:
            if r.status_code == 206 and have:
                start = r.headers.get("content-range", "").removeprefix("bytes ").split("-")[0]
                if start != str(have):
                    raise httpx.RemoteProtocolError(f"bad Content-Range for bytes={have}-")
                mode = "ab"
            elif r.status_code == 200:
                have, mode = 0, "wb"  # no Range support: start over
            elif r.status_code == 416:
                part.unlink(missing_ok=True)
                raise _Interrupted("the server refused the resume (HTTP 416)")
            else:
                raise DataUnavailableError(f"HTTP {r.status_code}")
            bar.reset(total=file.size)
            bar.update(have)
            with part.open(mode) as fh:
                for chunk in r.iter_raw():
                    if have + len(chunk) > file.size:
                        fh.close()
                        part.unlink()
                        raise DataUnavailableError(
                            f"the server sent more than the pinned {file.size} bytes"
                        )
                    fh.write(chunk)
                    have += len(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                fh.flush()
                os.fsync(fh.fileno())
    except (httpx.ReadError, httpx.RemoteProtocolError, httpx.ReadTimeout) as exc:
        why = f"{type(exc).__name__} after {have} of {file.size} bytes"
        raise _Interrupted(why, received) from exc
    if have < file.size:
        raise _Interrupted(f"the transfer ended after {have} of {file.size} bytes", received)
    return received, mode == "ab"


def _fetch(
    client: httpx.Client,
    bench: Benchmark,
    file: SourceFile,
    dest: Path,
    url: str,
    *,
    force: bool,
    progress: bool,
    retries: int,
) -> FileResult:
    from tqdm import tqdm

    present = dest.is_file() and dest.stat().st_size == file.size
    if not force and present and file_sha256(dest) == file.sha256:
        return FileResult(dest, url, file.sha256, file.size, "present", 0)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    fetched, resumed = 0, False
    label = f"{bench.name}/{file.path}"
    with tqdm(
        total=file.size,
        unit="B",
        unit_scale=True,
        desc=label,
        file=sys.stderr,
        disable=not progress,
        leave=False,
    ) as bar:
        for attempt in range(retries + 1):
            try:
                got, was_resumed = _transfer(client, url, part, file, bar)
            except _Interrupted as exc:
                fetched += exc.received
                if attempt == retries:
                    raise _unavailable(
                        bench,
                        file,
                        url,
                        f"download interrupted ({exc}); run the command again to resume",
                    ) from exc
                continue
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                raise _unavailable(
                    bench, file, url, f"cannot reach the server ({type(exc).__name__}: {exc})"
                ) from exc
            except DataUnavailableError as exc:
                raise _unavailable(bench, file, url, str(exc)) from exc
            fetched += got
            resumed = was_resumed
            break
    digest = file_sha256(part)
    if digest != file.sha256:
        part.unlink()
        raise _unavailable(bench, file, url, f"checksum mismatch: the download has sha256 {digest}")
    os.replace(part, dest)  # atomic: the good file is replaced only by a verified one
    action: Action = "resumed" if resumed else "downloaded"
    return FileResult(dest, url, file.sha256, file.size, action, fetched)


def pull(
    names: Iterable[str] = ("all",),
    *,
    root: Path | None = None,
    mirror: str | None = None,
    force: bool = False,
    progress: bool = False,
    retries: int = 2,
    timeout: float = 30.0,
) -> list[PullResult]:
    """Download the benchmarks ``names`` (``all``: every one) into ``root`` (default:
    :func:`~safetygame.eval.sources.pulled_root`). Raises DataUnavailableError at the first
    file that cannot be fetched or verified; files finished before it stay."""
    if retries < 0:
        raise ConfigError("retries must be >= 0")
    base = root if root is not None else pulled_root()
    wanted = resolve_names(names)
    m = _mirror(mirror)
    out: list[PullResult] = []
    with httpx.Client(follow_redirects=True, timeout=timeout) as client:
        for name in wanted:
            bench = SOURCES[name]
            files = tuple(
                _fetch(
                    client,
                    bench,
                    f,
                    base / name / f.path,
                    source_url(bench, f, m),
                    force=force,
                    progress=progress,
                    retries=retries,
                )
                for f in bench.files
            )
            out.append(PullResult(name, base / name, files))
    return out


def _where(name: str) -> tuple[Path | None, UsedFrom]:
    try:
        p = benchmark_dir(name)
    except ConfigError:
        return None, "none"
    if not p.is_dir():
        return None, "none"
    if os.environ.get(DATA_ENV):
        return p, "SAFETYGAME_DATA"
    return p, "pull" if p.parent == pulled_root() else "shared"


def status(names: Sequence[str] = ("all",), root: Path | None = None) -> list[BenchmarkStatus]:
    """Per benchmark: its pulled files (each re-hashed) and the folder the loaders read."""
    base = root if root is not None else pulled_root()
    out = []
    for name in resolve_names(names):
        bench = SOURCES[name]
        ok = bad = 0
        for f in bench.files:
            p = base / name / f.path
            if p.is_file():
                if p.stat().st_size == f.size and file_sha256(p) == f.sha256:
                    ok += 1
                else:
                    bad += 1
        state: Literal["complete", "partial", "corrupt", "absent"] = (
            "corrupt"
            if bad
            else "complete"
            if ok == len(bench.files)
            else "partial"
            if ok
            else "absent"
        )
        used, used_from = _where(name)
        out.append(
            BenchmarkStatus(
                name,
                bench.upstream,
                bench.license,
                bench.size,
                len(bench.files),
                ok,
                state,
                base / name,
                used,
                used_from,
            )
        )
    return out
