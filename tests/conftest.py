"""Shared fixtures: real small models (SmolLM2-135M via llama.cpp), started once per session."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import safetygame
from safetygame.backends.llamacpp import EmbeddedLlamaBackend
from safetygame.errors import ConfigError
from safetygame.eval.datasets import data_root

SMALL_MODEL = "smollm2-135m"
REQUIRE_DATA_ENV = "SAFETYGAME_REQUIRE_DATA"


@pytest.fixture(scope="session")
def benchmark_data() -> Path:
    """The benchmark data folder (``../shared/data`` or a pull; never committed). Tests that
    read it skip without it, with the reason, unless ``SAFETYGAME_REQUIRE_DATA=1`` (set by
    ``.ci/run``) makes its absence a failure."""
    try:
        return data_root()
    except ConfigError as exc:
        if os.environ.get(REQUIRE_DATA_ENV) == "1":
            pytest.fail(f"{REQUIRE_DATA_ENV}=1 and {exc}")
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def smollm2_backend() -> Iterator[EmbeddedLlamaBackend]:
    """An embedded llama.cpp backend on SmolLM2-135M (4 slots of 2048 tokens), shared."""
    backend = EmbeddedLlamaBackend(SMALL_MODEL, n_parallel=4, n_ctx=2048, threads=2)
    yield backend
    asyncio.run(backend.aclose())


@contextlib.contextmanager
def llama_server(args: list[str], log_dir: Path) -> Iterator[str]:
    """A ``python -m safetygame.backends.llamacpp`` subprocess on loopback serving SmolLM2-135M
    with ``args``; yields its base URL once healthy, stops it after."""
    src = str(Path(safetygame.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "safetygame.backends.llamacpp", "--model", SMALL_MODEL]
    cmd += ["--port", "0", *args]
    log = log_dir / "stderr.log"
    with open(log, "w") as err_file:  # a file, not a pipe: a full pipe would stall the server
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_file, text=True, env=env)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http://"):
            raise RuntimeError(f"llama.cpp server did not start: {url!r} {log.read_text()[-2000:]}")
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/health", timeout=5).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("llama.cpp server never became healthy")
            time.sleep(0.2)
        yield url
    finally:
        stop_process(proc, timeout=10)


def quoted_reply(prompt: str) -> str:
    """The reply a judge prompt quotes (its ``<candidate_reply>`` tag): what test doubles of a
    judge or a hidden-state reader answer from."""
    return prompt.split("<candidate_reply>\n", 1)[1].split("\n</candidate_reply>", 1)[0]


def stop_process(proc: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM, and SIGKILL if it has not exited within ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def llama_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a llama.cpp server subprocess on loopback serving SmolLM2-135M."""
    args = ["--n-parallel", "4", "--ctx", "2048", "--threads", "2"]
    with llama_server(args, tmp_path_factory.mktemp("llama_server")) as url:
        yield url
