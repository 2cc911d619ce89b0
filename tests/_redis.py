"""Throwaway ``redis-server`` processes for tests: free port, own dir, kill and restart by pid.

Never touches a Redis the tests did not start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ("RedisServer", "free_port", "given_or_throwaway", "redis_server_path")


def redis_server_path() -> str | None:
    """The ``redis-server`` binary on PATH, or None."""
    return shutil.which("redis-server")


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    """One redis-server on 127.0.0.1, started by the test run and stopped by pid."""

    dir: Path
    appendonly: bool = False
    port: int = field(default_factory=free_port)
    password: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:<port>/0``."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start (or restart on the same port and dir) and wait until it answers PING."""
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [redis_server_path() or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), "--save", "", "--daemonize", "no", "--protected-mode", "no",
                "--logfile", str(self.dir / "redis.log"),
                "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.dir / 'redis.log'}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server on port {self.port} not ready within {timeout}s")
            time.sleep(0.02)
        return self

    def _ready(self) -> bool:
        if self.password is None:
            return _ping(self.port)
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(f"AUTH {self.password}\r\nPING\r\n".encode())
                time.sleep(0.01)
                return b"+PONG" in s.recv(64)
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL this server (by pid) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM this server (by pid), SIGKILL if it lingers."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()

    def wipe(self) -> None:
        """Delete the data files (the server must be stopped): the next start is empty."""
        for name in ("appendonlydir", "dump.rdb"):
            path = self.dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


@contextlib.contextmanager
def given_or_throwaway(url: str | None, *, prefix: str = "bench-redis-") -> Iterator[tuple[str, RedisServer | None]]:
    """``url`` as it is, or (when None) a throwaway redis-server for the block: the benchmarks' ``--url``."""
    if url is not None:
        yield url, None
        return
    import tempfile

    server = RedisServer(Path(tempfile.mkdtemp(prefix=prefix))).start()
    try:
        yield server.url, server
    finally:
        server.stop()
