"""Several gateway processes on one listening socket: ``safetygame serve --workers N``.

One event loop runs a gateway's Python work (parsing, the upstream exchanges, the LP, the
audit record) on one core. ``--workers N`` binds the socket once in a supervisor process and
starts N ordinary gateway processes that accept on it; the kernel gives each new connection
to whichever worker accepts first. Workers are stateless: each has its own upstream client,
policy watcher and audit-store connection, and records are keyed by request id, so they may
share one SQLite file (writers take turns) or one PostgreSQL database.

The supervisor restarts a worker that dies and stops them all on SIGINT/SIGTERM. Metrics
add up: the workers share a private prometheus_client multiprocess folder that the
supervisor creates and removes (``metrics.SharedMetricsDir``), so any worker's ``/metrics``
reports the totals of all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from safetygame.errors import ConfigError, SafetygameError
from safetygame.gateway.metrics import SharedMetricsDir

log = logging.getLogger("safetygame.gateway.workers")

RESTART_DELAY_S = 1.0  # between a worker's death and its replacement (no tight crash loop)


def listen(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A bound, listening TCP socket that child processes can inherit."""
    try:
        sock = socket.create_server((host, port), backlog=backlog)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


class WorkerPool:
    """``workers`` copies of ``command + ["--fd", FD]`` sharing the listening socket ``sock``.

    ``command`` is a ``safetygame serve`` command line that prints its URL on the first
    stdout line once it accepts connections (the pool waits for that line). ``stdin``: text
    written to each worker's stdin (``serve --settings-stdin`` reads its settings there, so
    secrets stay off command lines). ``env``: added to each worker's environment.
    ``on_exit(pid)``: called once for each worker seen exited (restarted or stopped)."""

    def __init__(
        self,
        command: Sequence[str],
        sock: socket.socket,
        workers: int,
        *,
        ready_timeout: float = 120.0,
        stdin: str | None = None,
        env: Mapping[str, str] | None = None,
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        if workers < 1:
            raise ConfigError("--workers must be >= 1")
        self.command = [*command, "--fd", str(sock.fileno())]
        self.sock = sock
        self.workers = workers
        self.ready_timeout = ready_timeout
        self.stdin = stdin
        self.env = None if env is None else {**os.environ, **env}
        self.on_exit = on_exit
        self.procs: list[subprocess.Popen[str]] = []
        self._stop = threading.Event()

    def _spawn(self) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            self.command,
            stdin=None if self.stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            pass_fds=(self.sock.fileno(),),
            env=self.env,
        )
        assert proc.stdout is not None
        if proc.stdin is not None:
            with contextlib.suppress(OSError):  # a worker that died at once: reported below
                proc.stdin.write(self.stdin or "")
                proc.stdin.close()
        line = _readline(proc, self.ready_timeout)
        proc.stdout.close()  # a worker prints only its ready line
        if not line.startswith("http"):
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
            self._exited(proc)
            raise SafetygameError(
                f"gateway worker did not start (exit code {proc.returncode}); its log is above"
            )
        return proc

    def start(self) -> None:
        try:
            for _ in range(self.workers):
                self.procs.append(self._spawn())
        except BaseException:
            self.stop()
            raise

    def supervise(self, poll: float = 0.5) -> None:
        """Until ``stop``: replace any worker that exits."""
        while not self._stop.wait(poll):
            for i, proc in enumerate(self.procs):
                if proc.poll() is None:
                    continue
                log.warning(
                    "gateway worker %d exited (code %s); restarting it", proc.pid, proc.returncode
                )
                self._exited(proc)
                if self._stop.wait(RESTART_DELAY_S):
                    return
                try:
                    self.procs[i] = self._spawn()
                except SafetygameError as exc:
                    log.error("%s; retrying", exc)

    def request_stop(self) -> None:
        """Make ``supervise`` return (safe from a signal handler)."""
        self._stop.set()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every worker (each finishes its requests in flight), then wait."""
        self._stop.set()
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self._exited(proc)

    def _exited(self, proc: subprocess.Popen[str]) -> None:
        if self.on_exit is not None:
            self.on_exit(proc.pid)


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    """The first stdout line of ``proc``, or "" after ``timeout`` (the process is killed)."""
    out: list[str] = []
    assert proc.stdout is not None
    stdout = proc.stdout
    reader = threading.Thread(target=lambda: out.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        proc.kill()
        reader.join(5)
    return out[0].strip() if out else ""


def run_workers(
    command: Sequence[str],
    host: str,
    port: int,
    workers: int,
    on_ready: Callable[[str, list[int]], None],
    *,
    stdin: str | None = None,
) -> None:
    """Bind ``host:port``, start the pool, call ``on_ready(url, pids)``, supervise until
    SIGINT/SIGTERM, stop the workers. ``stdin``: written to each worker's stdin."""
    sock = listen(host, port)
    bound = sock.getsockname()
    metrics: SharedMetricsDir | None = None
    try:  # from here on, a failure (building the pool too) leaves no temp folder behind
        metrics = SharedMetricsDir()
        pool = WorkerPool(
            command, sock, workers, stdin=stdin, env=metrics.env(), on_exit=metrics.process_exited
        )

        def on_signal(signum: int, _frame: object) -> None:
            pool.request_stop()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            pool.start()
            on_ready(f"http://{bound[0]}:{bound[1]}", [p.pid for p in pool.procs])
            pool.supervise()
        finally:
            pool.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
    finally:
        sock.close()
        if metrics is not None:
            metrics.close()


def worker_socket(fd: int) -> socket.socket:
    """The listening socket a supervisor passed to this worker as file descriptor ``fd``."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigError(f"--fd {fd}: not an open socket ({exc.strerror or exc})") from None
    if sock.type != socket.SOCK_STREAM:
        raise ConfigError(f"--fd {fd}: not a stream socket")
    os.set_inheritable(fd, False)
    return sock


def worker_command(args: Sequence[str] = ("--settings-stdin",)) -> list[str]:
    """The command line of one worker: ``safetygame serve`` with ``args`` (by default: read
    the supervisor's validated settings from stdin)."""
    return [sys.executable, "-m", "safetygame.cli", "serve", *args]
