"""The development Authority's HTTP face: discovery, JWKS and the token endpoint.

asyncio streams + httptools (all llhttp leniencies off), one request per connection
(``Connection: close``), small size caps. An optional second listener requests TLS client
certificates and serves the same routes; discovery advertises it under
``mtls_endpoint_aliases`` (RFC 8705 §5). DEVELOPMENT ONLY — it refuses non-loopback
addresses unless ``allow_remote=True``.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import threading
from urllib.parse import parse_qs

import httptools
import orjson

from .authority import Authority, TokenError
from .jose import DPOP_ALGS

log = logging.getLogger("stellagw.devauth")
MAX_HEAD, MAX_BODY, READ_TIMEOUT = 16 * 1024, 64 * 1024, 10.0
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 413: "Payload Too Large",
            431: "Request Header Fields Too Large", 500: "Internal Server Error"}
_DISCOVERY = ("/.well-known/openid-configuration", "/.well-known/oauth-authorization-server")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Request:
    __slots__ = ("method", "path", "headers", "body", "done", "size")

    def __init__(self):
        self.method, self.path, self.headers, self.body = "", b"", [], bytearray()
        self.done, self.size = False, 0

    def on_url(self, url: bytes):  # httptools callbacks
        self.path += url

    def on_header(self, name: bytes, value: bytes):
        self.size += len(name) + len(value)
        if self.size > MAX_HEAD:
            raise _HttpError(431, "headers too large")
        self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_body(self, body: bytes):
        self.body += body
        if len(self.body) > MAX_BODY:
            raise _HttpError(413, "body too large")

    def on_message_complete(self):
        self.done = True

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]


class _HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class DevAuthority:
    """``async with DevAuthority(port=0) as auth: auth.issuer, auth.port, auth.mint(...)``.

    Extra keyword arguments go to :class:`Authority` (audience, clients, lifetime, key_file,
    rs256, require_nonce, ...). ``ssl`` makes the main listener HTTPS; ``mtls_ssl`` (a server
    context with ``verify_mode`` CERT_OPTIONAL/REQUIRED and the client CA loaded) adds the
    mTLS listener on ``mtls_port`` (0 = any free port)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, ssl=None, mtls_ssl=None,
                 mtls_port: int = 0, issuer: str | None = None,
                 authority: Authority | None = None, allow_remote: bool = False,
                 admin: bool = False, **authority_kwargs):
        if not allow_remote and not _is_loopback(host):
            raise ValueError(f"the development Authority binds loopback only (got {host!r})")
        self.host, self.port, self.ssl = host, port, ssl
        self.mtls_ssl, self.mtls_port = mtls_ssl, mtls_port
        self.authority = authority or Authority(issuer, **authority_kwargs)
        self.admin = admin
        self._issuer = issuer or self.authority.issuer
        self._servers: list[asyncio.AbstractServer] = []
        self._thread = self._loop = self._stop_event = None

    # -- URLs ---------------------------------------------------------------------------
    def _base(self, scheme: str, port: int) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{port}"

    @property
    def issuer(self) -> str:
        return self._issuer or self._base("https" if self.ssl else "http", self.port)

    token_endpoint = property(lambda self: self.issuer.rstrip("/") + "/token")
    jwks_uri = property(lambda self: self.issuer.rstrip("/") + "/jwks")

    @property
    def mtls_token_endpoint(self) -> str | None:
        return self._base("https", self.mtls_port) + "/token" if self.mtls_ssl else None

    def discovery(self) -> dict:
        doc = {"issuer": self.issuer, "jwks_uri": self.jwks_uri,
               "token_endpoint": self.token_endpoint,
               "grant_types_supported": ["client_credentials"],
               "token_endpoint_auth_methods_supported": ["client_secret_basic",
                                                         "client_secret_post"],
               "dpop_signing_alg_values_supported": list(DPOP_ALGS),
               "scopes_supported": sorted({s for c in self.authority.clients.values()
                                           for s in c.scopes}),
               "tls_client_certificate_bound_access_tokens": bool(self.mtls_ssl)}
        if self.mtls_ssl:
            doc["mtls_endpoint_aliases"] = {"token_endpoint": self.mtls_token_endpoint}
        return doc

    def mint(self, *args, **kwargs) -> str:  # passthroughs to the Authority
        return self.authority.mint(*args, **kwargs)

    def rotate(self, alg: str = "ES256") -> str:
        return self.authority.rotate(alg)

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> "DevAuthority":
        srv = await asyncio.start_server(lambda r, w: self._serve(r, w, False), self.host,
                                         self.port, ssl=self.ssl)
        self._servers.append(srv)
        self.port = srv.sockets[0].getsockname()[1]
        if self.mtls_ssl is not None:
            msrv = await asyncio.start_server(lambda r, w: self._serve(r, w, True), self.host,
                                              self.mtls_port, ssl=self.mtls_ssl)
            self._servers.append(msrv)
            self.mtls_port = msrv.sockets[0].getsockname()[1]
        if not self.authority.issuer:
            self.authority.issuer = self.issuer
        self._stop_event = asyncio.Event()
        return self

    async def close(self) -> None:
        for srv in self._servers:
            srv.close()
        for srv in self._servers:
            await srv.wait_closed()
        self._servers.clear()

    async def __aenter__(self) -> "DevAuthority":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def start_in_thread(self, timeout: float = 10.0) -> "DevAuthority":
        """Serve from a daemon thread with its own uvloop loop; ``stop()`` ends it."""
        import uvloop
        ready, errors = threading.Event(), []

        def runner():
            loop = self._loop = uvloop.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # reported to the caller below
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_until_complete(self._stop_event.wait())
                loop.run_until_complete(self.close())
            finally:
                loop.close()

        self._thread = threading.Thread(target=runner, name="dev-authority", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError("development Authority did not start")
        if errors:
            raise errors[0]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop_event.set)
            self._thread.join(timeout)
        self._thread = None

    # -- HTTP ---------------------------------------------------------------------------
    async def _serve(self, reader, writer, mtls: bool) -> None:
        req = _Request()
        parser = httptools.HttpRequestParser(req)
        try:
            try:
                while not req.done:
                    data = await asyncio.wait_for(reader.read(65536), READ_TIMEOUT)
                    if not data:
                        return
                    parser.feed_data(data)
                req.method = parser.get_method().decode("ascii")
                status, headers, body = self._route(req, writer, mtls)
            except _HttpError as exc:
                status, headers, body = exc.status, [], {"error": "invalid_request",
                                                         "error_description": str(exc)}
            except httptools.HttpParserError as exc:
                cause = exc.__context__
                status = cause.status if isinstance(cause, _HttpError) else 400
                headers, body = [], {"error": "invalid_request", "error_description": "bad HTTP"}
            except (asyncio.TimeoutError, ConnectionError):
                raise
            except Exception:  # a bug here must not kill the connection silently
                log.exception("dev-authority: internal error")
                status, headers, body = 500, [], {"error": "server_error"}
            payload = orjson.dumps(body)
            head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
                    "Content-Type: application/json", f"Content-Length: {len(payload)}",
                    "Connection: close", *(f"{k}: {v}" for k, v in headers)]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)
            await writer.drain()
            log.info("%s %s -> %d", req.method or "-", req.path.decode("latin-1", "replace"), status)
        except (asyncio.TimeoutError, ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def _route(self, req: _Request, writer, mtls: bool):
        path = req.path.split(b"?", 1)[0].decode("latin-1")
        no_store = [("Cache-Control", "no-store"), ("Pragma", "no-cache")]
        if path in _DISCOVERY or path == "/jwks":
            if req.method != "GET":
                return 405, [("Allow", "GET")], {"error": "method_not_allowed"}
            body = self.discovery() if path in _DISCOVERY else self.authority.jwks()
            return 200, [("Cache-Control", "max-age=60")], body
        if path == "/admin/rotate" and self.admin:
            peer = writer.get_extra_info("peername")
            if req.method != "POST" or not peer or not _is_loopback(peer[0]):
                return 403, [], {"error": "forbidden"}
            return 200, no_store, {"kid": self.authority.rotate(
                parse_qs(bytes(req.body).decode("utf-8", "replace")).get("alg", ["ES256"])[0])}
        if path != "/token":
            return 404, [], {"error": "not_found"}
        if req.method != "POST":
            return 405, [("Allow", "POST")], {"error": "method_not_allowed"}
        ctype = (req.header("content-type") or [""])[0].split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            return 400, no_store, {"error": "invalid_request",
                                   "error_description": "form-encoded body required"}
        try:
            form = parse_qs(bytes(req.body).decode("utf-8"), keep_blank_values=True,
                            max_num_fields=32)
        except ValueError:
            return 400, no_store, {"error": "invalid_request", "error_description": "bad form"}
        peer_cert = None
        sslobj = writer.get_extra_info("ssl_object")
        if sslobj is not None:
            peer_cert = sslobj.getpeercert(binary_form=True)
        endpoint = self.mtls_token_endpoint if mtls else self.token_endpoint
        try:
            body, extra = self.authority.token_request(
                form, authorization=req.header("authorization"), dpop=req.header("dpop"),
                token_endpoint=endpoint, peer_cert=peer_cert)
        except TokenError as exc:
            return exc.status, [*no_store, *exc.headers], {"error": exc.error,
                                                           "error_description": exc.description}
        return 200, [*no_store, *extra], body


def run(host: str = "127.0.0.1", port: int = 8400, *, on_ready=None, **kwargs) -> int:
    """Serve until SIGINT/SIGTERM (blocking; for the CLI). ``on_ready(auth)`` runs once
    the listeners are bound."""
    import uvloop

    async def main():
        async with DevAuthority(host, port, **kwargs) as auth:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            if on_ready is not None:
                on_ready(auth)
            await stop.wait()

    uvloop.run(main())
    return 0
