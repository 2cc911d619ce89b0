"""``rediss://`` with a password: the bus works over TLS against a redis-server that only speaks TLS."""

from __future__ import annotations

import asyncio
import gc
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.bus import BusSettings
from protocol.envelope import Envelope
from protocol.messages import Assign, Done
from protocol.redis_bus import RedisBus
from tests._redis import free_port, redis_server_path
from tests.protocol.test_bus_contract import take

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A TLS-only redis-server with a password and a self-signed certificate; yields (url, CA file)."""
    if redis_server_path() is None or shutil.which("openssl") is None:
        pytest.skip("needs redis-server (built with TLS) and openssl on PATH")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=30)
    port = free_port()
    log = tmp_path / "redis.log"
    proc = subprocess.Popen([redis_server_path() or "redis-server", "--port", "0", "--tls-port", str(port),
                             "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file",
                             str(cert), "--tls-auth-clients", "no", "--requirepass", "s3cret", "--save", "",
                             "--dir", str(tmp_path), "--logfile", str(log)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        if proc.poll() is not None:
            pytest.skip(f"this redis-server cannot serve TLS: {log.read_text()[-200:]}")
        yield f"rediss://:s3cret@127.0.0.1:{port}/0?ssl_ca_certs={cert}", cert
    finally:
        proc.kill()
        proc.wait(10)


async def test_round_trip_over_tls_with_a_password(tls_redis: tuple[str, Path]) -> None:
    url, _ = tls_redis
    async with RedisBus.from_url(url, settings=BusSettings(lease_s=5, block_s=0.05), namespace="tls",
                                 retry_budget_s=5) as bus:
        sent = Envelope(run_id="r", task_id="t", attempt=1, body=Assign(capability="echo", instruction="hi"))
        await bus.publish("tasks.echo", sent)
        [d] = await take(bus.consume("tasks.echo", group="w", consumer="c"), 1)
        await bus.commit(d, "results.echo", d.envelope.reply(Done(output="ok"), sender="c"))
        [r] = await take(bus.consume("results.echo", group="m", consumer="m"), 1)
    assert d.envelope == sent
    assert r.envelope.body == Done(output="ok")


async def test_a_wrong_password_over_tls_is_reported_without_the_password(tls_redis: tuple[str, Path]) -> None:
    url, _ = tls_redis
    from protocol.errors import BusError

    wrong = url.replace("s3cret", "wrong-pass")
    started = time.monotonic()
    with pytest.raises(BusError) as info:
        async with RedisBus.from_url(wrong, namespace="tls", retry_budget_s=30) as bus:  # fails at once, not in 30 s
            await bus.publish("tasks.echo", Envelope(body=Assign(capability="echo", instruction="x")))
    assert time.monotonic() - started < 10
    await _tls_closes_finished(int(url.rsplit(":", 1)[1].split("/")[0]))
    assert "refused the credentials" in str(info.value)
    assert "wrong-pass" not in str(info.value)
    assert "***" in str(info.value)


async def _tls_closes_finished(port: int, timeout_s: float = 10.0) -> None:
    """Wait until no socket to ``port`` is still in its TLS close handshake.

    redis-py drops a connection whose AUTH failed without waiting for the TLS close_notify exchange,
    which then finishes in the background. A test's event loop closes when the test returns, so one
    still mid-handshake would be garbage-collected unclosed (a ResourceWarning in a later test).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        open_ = [t for t in gc.get_objects() if isinstance(t, asyncio.Transport)
                 and not t.is_closing() and (t.get_extra_info("peername") or ("", 0))[1] == port]
        if not open_:
            await asyncio.sleep(0.05)  # closing transports drop their socket on the next loop turn
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"a TLS connection to port {port} never finished closing")
