"""Shared test machinery: settings from YAML text, a gateway worker on a real loopback
socket in a background thread, raw HTTP over sockets, and a throwaway PKI."""
from __future__ import annotations

import asyncio
import datetime
import os
import selectors
import socket
import ssl
import threading
import time

import uvloop

from stellagw.config import load_config_text
from stellagw.gateway import Worker, listen_socket
from tests.support import REPO


def settings_from(yaml_text: str = "", **env):
    return load_config_text(yaml_text, env=env or {})


class NullLog:
    """Collects log records instead of writing them (for asserting on what is logged)."""

    def __init__(self):
        from stellagw.observe.logs import JsonLog
        r, w = os.pipe()
        self._r, self._w = r, w
        os.set_blocking(r, False)
        self._wfile = os.fdopen(w, "wb", buffering=0)  # JsonLog keeps only the fd
        self.log = JsonLog("debug", stream=self._wfile, access_log=True)

    def lines(self) -> list[bytes]:
        self.log.drain()
        chunks = []
        while True:
            try:
                chunk = os.read(self._r, 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).splitlines()


class GatewayThread:
    """A Worker serving on 127.0.0.1:<free port> in its own thread and uvloop loop."""

    def __init__(self, settings, log=None, **worker_kwargs):
        import dataclasses
        self._worker_kwargs = worker_kwargs
        gw = settings.gateway
        if gw.transports.tcp.port == 9100:
            # Tests never take the well-known port: parallel gateways would share it.
            tcp = dataclasses.replace(gw.transports.tcp, port=0)
            settings = dataclasses.replace(settings, gateway=dataclasses.replace(
                gw, transports=dataclasses.replace(gw.transports, tcp=tcp)))
        self.settings = settings
        self.loop = uvloop.new_event_loop()
        self.worker: Worker | None = None
        self._log = log
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _run(self):
        asyncio.set_event_loop(self.loop)

        async def main():
            self.worker = Worker(self.settings, 0, log=self._log, **self._worker_kwargs)
            gw = self.settings.gateway
            await self.worker.start(listen_socket(gw.http.host, gw.http.port, 128))
            self._ready.set()
            await self.worker.wait_stopped()

        try:
            self.loop.run_until_complete(main())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()

    def start(self) -> "GatewayThread":
        self._thread.start()
        self._ready.wait(10)
        if self._error:
            raise self._error
        return self

    @property
    def port(self) -> int:
        return self.worker.http_address[1]

    @property
    def transport_port(self) -> int:
        return self.worker.transport_addresses["tcp"][1]

    def call(self, fn, *args):
        """Run fn(*args) on the gateway loop and return its result."""
        done = threading.Event()
        box = {}

        def run():
            try:
                box["v"] = fn(*args)
            finally:
                done.set()
        self.loop.call_soon_threadsafe(run)
        done.wait(5)
        return box.get("v")

    def drain(self, wait: bool = True):
        fut = asyncio.run_coroutine_threadsafe(self.worker.drain(), self.loop)
        if wait:
            fut.result(30)
        return fut

    def stop(self):
        if self.worker is not None and not self.worker._drain_started:
            self.drain()
        self._thread.join(10)
        self.loop.close()


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_response(sock: socket.socket, buf: bytearray | None = None):
    """Read one HTTP/1.1 response (content-length framed). Returns (status, headers, body, rest)."""
    buf = buf if buf is not None else bytearray()
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a full response head: {bytes(buf)!r}")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower().decode()] = v.strip().decode()
    length = int(headers.get("content-length", "0"))
    rest = bytearray(rest)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed inside a response body")
        rest += chunk
    body, leftover = bytes(rest[:length]), rest[length:]
    buf[:] = leftover
    return status, headers, body


def request(port: int, raw: bytes, timeout: float = 5.0):
    with connect(port, timeout) as s:
        s.sendall(raw)
        return read_response(s)


def is_closed(sock: socket.socket, timeout: float = 3.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


class Pki:
    """A CA plus server and client certificates, made with `cryptography` into a folder."""

    def __init__(self, folder):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.folder = str(folder)
        now = datetime.datetime.now(datetime.timezone.utc)

        def name(cn):
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        def write(fname, data):
            path = os.path.join(self.folder, fname)
            with open(path, "wb") as f:
                f.write(data)
            return path

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (x509.CertificateBuilder().subject_name(name("stellagw test CA"))
              .issuer_name(name("stellagw test CA")).public_key(ca_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5))
              .not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .sign(ca_key, hashes.SHA256()))
        self.ca_path = write("ca.pem", ca.public_bytes(serialization.Encoding.PEM))

        def leaf(cn, server: bool):
            key = ec.generate_private_key(ec.SECP256R1())
            b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
                 .public_key(key.public_key()).serial_number(x509.random_serial_number())
                 .not_valid_before(now - datetime.timedelta(minutes=5))
                 .not_valid_after(now + datetime.timedelta(days=1)))
            if server:
                b = b.add_extension(x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]),
                    critical=False)
            return key, b.sign(ca_key, hashes.SHA256())

        skey, scert = leaf("localhost", True)
        self.server_cert = write("server.pem", scert.public_bytes(serialization.Encoding.PEM))
        self.server_key = write("server.key", skey.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        from cryptography.hazmat.primitives.serialization import pkcs12
        self.server_pfx_password = "pfx-secret"
        self.server_pfx = write("server.pfx", pkcs12.serialize_key_and_certificates(
            b"server", skey, scert, None,
            serialization.BestAvailableEncryption(self.server_pfx_password.encode())))
        ckey, ccert = leaf("client-1", False)
        self.client_cert_der = ccert.public_bytes(serialization.Encoding.DER)
        self.client_cert = write("client.pem", ccert.public_bytes(serialization.Encoding.PEM))
        self.client_key = write("client.key", ckey.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        # A second client of the same CA: valid for TLS, but not on an allow-list.
        okey, ocert = leaf("client-2", False)
        self.other_cert_der = ocert.public_bytes(serialization.Encoding.DER)
        self.other_cert = write("other.pem", ocert.public_bytes(serialization.Encoding.PEM))
        self.other_key = write("other.key", okey.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))

    def client_context(self, with_cert: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_path)
        if with_cert:
            ctx.load_cert_chain(self.client_cert, self.client_key)
        return ctx


class Pump:
    """`connections` client connections to `port`, each sending `raw` again as soon as it
    has an answer, so requests are in flight all the time (a context manager; bounded by
    the `with` block)."""

    def __init__(self, port: int, raw: bytes, connections: int = 40):
        self.socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
        self._raw = raw
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Pump":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in self.socks:
            s.close()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        for s in self.socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
            s.send(self._raw)
        while not self._stop.is_set():
            for key, _ in sel.select(0.05):
                try:
                    data = key.fileobj.recv(65536)
                except (BlockingIOError, ConnectionError):
                    continue
                if data:
                    key.fileobj.send(self._raw * data.count(b"HTTP/1.1 "))


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


ROOT = str(REPO)


class Served:
    """`python -m stellagw serve` in a subprocess; its JSON log lines are read as they come."""

    def __init__(self, *args, config_text: str | None = None, tmp_path=None):
        import subprocess
        import sys
        cmd = [sys.executable, "-m", "stellagw", "serve", *args]
        if config_text is not None:
            cfg = os.path.join(str(tmp_path), "gateway.yaml")
            with open(cfg, "w") as f:
                f.write(config_text)
            cmd += ["--config", cfg]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[bytes] = []
        self._cond = threading.Condition()
        # Read the gateway's output all the time: a full pipe would stall its log writer.
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._seen = 0

    def _read(self):
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip(b"\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for_log(self, predicate, count=1, timeout=20):
        """Wait for `count` JSON log records matching `predicate`, among lines not yet
        consumed by an earlier wait."""
        import orjson
        deadline = time.monotonic() + timeout
        found = []
        with self._cond:
            while len(found) < count:
                while self._seen < len(self.lines) and len(found) < count:
                    line = self.lines[self._seen]
                    self._seen += 1
                    try:
                        rec = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(rec, dict) and predicate(rec):
                        found.append(rec)
                left = deadline - time.monotonic()
                if len(found) >= count or left <= 0 or (self.proc.poll() is not None
                                                        and self._seen >= len(self.lines)):
                    break
                self._cond.wait(min(left, 0.2))
        assert len(found) >= count, b"\n".join(self.lines[-40:]).decode(errors="replace")
        return found

    def wait_listening(self, count=1, timeout=20):
        return self.wait_for_log(lambda r: r.get("message") == "listening", count, timeout)

    def stop(self, sig=None):
        """Stop it and return its exit status. SIGINT by default: a test's teardown stops
        it at once, where SIGTERM (what a tested shutdown sends: pass it) first waits
        preStopDelay (2 s by default) with readiness failing."""
        import signal
        import subprocess
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT if sig is None else sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])
