"""Command-line entry points: ``dev-authority`` and ``call``.

Wire them into ``stellagw`` either by forwarding ``argv`` (``main(["call", ...])``,
``dev_authority_main([...])``, ``call_main([...])``) or by adding sub-parsers with
``add_dev_authority_arguments`` / ``add_call_arguments`` and running ``run_dev_authority(args)``
/ ``run_call(args)``. Exit codes: 0 ok (``call``: 2xx), 1 failure (``call``: any other
status, or no answer), 2 bad arguments or configuration. A failure is one line on stderr
naming the URL (or the address) and the reason, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import hashlib
import logging
import sys
import time

DEFAULT_AUTHORITY = "http://127.0.0.1:8400"
_TOKENS: dict[tuple, tuple[str, float]] = {}   # in-memory token cache, this process only
_KEYS: dict[str, object] = {}                   # one DPoP key per alg, this process only


# -- dev-authority ----------------------------------------------------------------------------
def default_key_file() -> str:
    """The state directory keeps the signing keys across restarts, so tokens a client holds
    stay valid when the development Authority restarts (as the real one's keys do)."""
    base = (os.environ.get("STELLAGW_STATE_DIR")
            or os.path.join(os.environ.get("XDG_STATE_HOME")
                            or os.path.join(os.path.expanduser("~"), ".local", "state"), "stellagw"))
    return os.path.join(base, "dev-authority-keys.pem")


def add_dev_authority_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--host", default="127.0.0.1", help="listen address (loopback only unless "
                   "--allow-remote)")
    p.add_argument("--port", type=int, default=8400)
    p.add_argument("--audience", default="stellaops-gateway", help="aud of minted tokens")
    p.add_argument("--clients", metavar="FILE", help="client table (YAML or JSON)")
    p.add_argument("--key-file", metavar="FILE", default=default_key_file(),
                   help="PEM signing keys; created on first start and kept, the last key of "
                   "each alg signs (default: %(default)s)")
    p.add_argument("--ephemeral", action="store_true",
                   help="keys in memory only, new at every start (tests)")
    p.add_argument("--lifetime", type=int, default=300, metavar="SECONDS", help="token lifetime")
    p.add_argument("--rs256", action="store_true", help="also publish an RS256 key")
    p.add_argument("--require-nonce", action="store_true",
                   help="token endpoint demands DPoP nonces (use_dpop_nonce)")
    p.add_argument("--issuer", help="issuer URL to advertise (default http(s)://HOST:PORT)")
    p.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate")
    p.add_argument("--tls-key", metavar="PEM")
    p.add_argument("--mtls-port", type=int, metavar="PORT",
                   help="also listen for mTLS (needs --tls-cert and --client-ca)")
    p.add_argument("--client-ca", metavar="PEM", help="CA for client certificates")
    p.add_argument("--admin", action="store_true", help="enable POST /admin/rotate (loopback)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host (DANGEROUS: anyone can mint tokens)")
    p.add_argument("--rotate", action="store_true",
                   help="append a new signing key to --key-file, print its kid and exit")
    return p


def run_dev_authority(args: argparse.Namespace) -> int:
    from .authority import Authority, SigningKey, append_key_file, load_clients
    from .pki import server_context
    from .server import DevAuthority, run

    if args.rotate:
        if not args.key_file:
            print("dev-authority: --rotate needs --key-file", file=sys.stderr)
            return 2
        key = SigningKey.generate("RS256" if args.rs256 else "ES256")
        append_key_file(args.key_file, key)
        print(key.kid)
        return 0
    if args.lifetime <= 0 or (args.mtls_port is not None and not (args.tls_cert and args.client_ca)):
        print("dev-authority: --lifetime must be > 0; --mtls-port needs --tls-cert and "
              "--client-ca", file=sys.stderr)
        return 2
    try:
        clients = load_clients(args.clients) if args.clients else None
        key_file = None if args.ephemeral else args.key_file
        if key_file:
            os.makedirs(os.path.dirname(os.path.abspath(key_file)), mode=0o700, exist_ok=True)
        authority = Authority(args.issuer, audience=args.audience, clients=clients,
                              lifetime=args.lifetime, key_file=key_file, rs256=args.rs256,
                              require_nonce=args.require_nonce)
        tls = server_context(args.tls_cert, args.tls_key) if args.tls_cert else None
        mtls = (server_context(args.tls_cert, args.tls_key, args.client_ca)
                if args.mtls_port is not None else None)
        DevAuthority(args.host, args.port, allow_remote=args.allow_remote, authority=authority)
    except (OSError, ValueError) as exc:
        print(f"dev-authority: configuration error: {exc}", file=sys.stderr)
        return 2

    def ready(auth: DevAuthority) -> None:
        out = ["stellagw development Authority -- DEVELOPMENT ONLY, never use in production",
               f"issuer:          {auth.issuer}",
               f"discovery:       {auth.issuer.rstrip('/')}/.well-known/openid-configuration",
               f"token endpoint:  {auth.token_endpoint}"]
        if auth.mtls_token_endpoint:
            out.append(f"mTLS token endp: {auth.mtls_token_endpoint}")
        out.append(f"signing keys:    {', '.join(k.alg + ' ' + k.kid for k in authority.keys)}")
        for c in authority.clients.values():
            out.append(f"client:          {c.client_id} / {c.secret}  scopes=\"{' '.join(c.scopes)}\""
                       f"  tenant={c.tenant}")
        print("\n".join(out), flush=True)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        return run(args.host, args.port, on_ready=ready, ssl=tls, mtls_ssl=mtls,
                   mtls_port=args.mtls_port or 0, authority=authority,
                   allow_remote=args.allow_remote, admin=args.admin)
    except OSError as exc:
        from .client import failure_reason
        where = f"{args.host}:{args.port}" + (f" (mTLS {args.host}:{args.mtls_port})"
                                              if args.mtls_port is not None else "")
        print(f"dev-authority: cannot listen on {where}: {failure_reason(exc)}", file=sys.stderr)
        return 1


def dev_authority_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="stellagw dev-authority",
                                description="development OIDC Authority (never production)")
    return run_dev_authority(add_dev_authority_arguments(p).parse_args(argv))


# -- call -------------------------------------------------------------------------------------
def add_call_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("url", metavar="URL")
    p.add_argument("-X", "--request", dest="method", metavar="METHOD",
                   help="HTTP method (default GET, or POST with -d)")
    p.add_argument("-d", "--data", help="request body; @FILE reads a file")
    p.add_argument("-H", "--header", action="append", default=[], metavar="'K: V'")
    p.add_argument("--authority", default=DEFAULT_AUTHORITY, metavar="ISSUER")
    p.add_argument("--client-id", default="demo-client")
    p.add_argument("--client-secret", default="demo-secret")
    p.add_argument("--scope", help="space-separated scopes (default: all the client may have)")
    p.add_argument("--tenant")
    p.add_argument("--no-dpop", action="store_true", help="plain Bearer token, no proof")
    p.add_argument("--alg", choices=("ES256", "EdDSA"), default="ES256", help="DPoP key alg")
    p.add_argument("--mtls", action="store_true",
                   help="certificate-bound token via the mTLS token endpoint (needs --cert)")
    p.add_argument("--token", help="use this access token instead of fetching one")
    p.add_argument("--cacert", metavar="PEM", help="CA for HTTPS (Authority and URL)")
    p.add_argument("--cert", metavar="PEM", help="client certificate (mTLS)")
    p.add_argument("--key", metavar="PEM", help="client certificate key")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("-v", "--verbose", action="store_true", help="show status and headers")
    return p


def _short(value: str) -> str:
    return value if len(value) <= 48 else f"{value[:40]}...({len(value)} chars)"


def run_call(args: argparse.Namespace) -> int:
    from .client import DpopKey, RequestFailed, TokenRequestError, call
    from .pki import client_context

    err = sys.stderr
    headers = {}
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            print(f"call: bad --header {h!r} (want 'Name: value')", file=err)
            return 2
        headers[name.strip()] = value.strip()
    body = args.data
    if body is not None and body.startswith("@"):
        try:
            with open(body[1:], "rb") as fh:
                body = fh.read()
        except OSError as exc:
            print(f"call: {exc}", file=err)
            return 2
    if body is not None and not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = "application/json"
    method = args.method or ("POST" if body is not None else "GET")
    if args.mtls and not args.cert:
        print("call: --mtls needs --cert (and --key)", file=err)
        return 2
    for what, url in (("", args.url), ("--authority ", args.authority)):
        if not url.lower().startswith(("http://", "https://")):
            print(f"call: {what}{url}: not an http:// or https:// URL", file=err)
            return 2
    use_dpop = not (args.no_dpop or args.mtls)
    ssl_ctx = None
    try:
        if args.cacert or args.cert or args.url.startswith("https") or \
                args.authority.startswith("https"):
            ssl_ctx = client_context(args.cacert, args.cert, args.key)
    except (OSError, ValueError) as exc:
        print(f"call: cannot use --cacert/--cert/--key: {exc}", file=err)
        return 2
    key = None
    if use_dpop:
        key = _KEYS.get(args.alg) or _KEYS.setdefault(args.alg, DpopKey.generate(args.alg))
    token = args.token
    if token is None:
        # Said apart from the request's own failure: with the demo, a wrong --authority is
        # the usual cause, and the gateway is not to blame.
        try:
            token = _token(args, key, ssl_ctx)
        except (TokenRequestError, RequestFailed) as exc:
            print(f"call: cannot get a token: {exc}", file=err)
            return 1
        except (ValueError, KeyError) as exc:   # an answer we cannot use
            print(f"call: cannot get a token from {args.authority}: {exc!r}", file=err)
            return 1
    try:
        status, rheaders, rbody = call(args.url, method, body, token=token, dpop_key=key,
                                       headers=headers, ssl=ssl_ctx, timeout=args.timeout)
    except RequestFailed as exc:
        print(f"call: {exc}", file=err)
        return 1
    except ValueError as exc:
        print(f"call: {args.url}: {exc}", file=err)
        return 2
    if args.verbose:
        print(f"> {method} {args.url}", file=err)
        scheme = "DPoP" if key else "Bearer"
        print(f"> Authorization: {scheme} {_short(token)}", file=err)
        for k, v in headers.items():
            print(f"> {k}: {v}", file=err)
    print(f"HTTP {status}", file=err)
    if args.verbose:
        for k, v in rheaders.items():
            print(f"< {k}: {v}", file=err)
    out = sys.stdout.buffer
    out.write(rbody)
    if rbody and not rbody.endswith(b"\n") and sys.stdout.isatty():
        out.write(b"\n")
    out.flush()
    return 0 if 200 <= status < 300 else 1


def _token(args, key, ssl_ctx) -> str:
    from .client import discover, fetch_token
    meta = discover(args.authority, ssl=ssl_ctx, timeout=args.timeout)
    endpoint = meta["token_endpoint"]
    if args.mtls:
        endpoint = meta.get("mtls_endpoint_aliases", {}).get("token_endpoint", endpoint)
    cache_key = (endpoint, args.client_id, hashlib.sha256(args.client_secret.encode()).digest(),
                 args.scope, args.tenant, args.mtls, args.cert, key.thumbprint() if key else None)
    cached = _TOKENS.get(cache_key)
    if cached and cached[1] > time.time() + 15:
        return cached[0]
    doc = fetch_token(endpoint, args.client_id, args.client_secret, args.scope, key, ssl_ctx,
                      tenant=args.tenant, bind="mtls" if args.mtls else None,
                      timeout=args.timeout)
    token = doc["access_token"]
    _TOKENS[cache_key] = (token, time.time() + int(doc.get("expires_in", 60)))
    return token


def call_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="stellagw call",
                                description="send a request with a DPoP-bound token")
    return run_call(add_call_arguments(p).parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    """``main(["dev-authority", ...])`` or ``main(["call", URL, ...])``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"dev-authority": dev_authority_main, "call": call_main}
    if not argv or argv[0] not in commands:
        print("usage: dev-authority [...] | call URL [...]", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":  # python -m stellagw.devauth.cli
    sys.exit(main())
