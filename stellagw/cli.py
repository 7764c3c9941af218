"""Command line: stellagw serve | reload | check-config | --version.

Exit codes: 0 ok, 2 bad arguments, bad configuration or an address that cannot be listened
on ("address in use"; nothing was started), 1 a failure while running. `reload`: 0 the
configuration was taken (or was unchanged, or needs a restart for some keys: said on
stderr), 2 it was refused (the key and why; the gateway keeps running what it had), 1 no
gateway answered. `call`, `ws`, `dev-authority`: a connection that fails (refused, timed
out, TLS, an error from the token endpoint) is one line naming the URL and the reason, exit 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time

from . import __version__


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stellagw", description="Stella Ops Gateway")
    p.add_argument("--version", action="version", version=f"stellagw {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", "-c", metavar="FILE", help="YAML configuration (defaults without)")
    serve.add_argument("--workers", type=int, metavar="N",
                       help="override gateway.node.workers (0 = one per CPU)")
    serve.add_argument("--port", type=int, metavar="PORT", help="override gateway.http.port")
    serve.add_argument("--pid-file", metavar="FILE",
                       help="write the gateway's process id here (for `stellagw reload`)")

    rel = sub.add_parser("reload", help="make a running gateway read its configuration and "
                                        "certificates again (SIGHUP), and say what it did")
    who = rel.add_mutually_exclusive_group(required=True)
    who.add_argument("--pid-file", metavar="FILE", help="the file `serve --pid-file` wrote")
    who.add_argument("--pid", type=int, metavar="PID",
                     help="signal this process (the supervisor, or the only worker); no verdict")
    rel.add_argument("--timeout", type=float, default=15.0, metavar="SECONDS",
                     help="how long to wait for the verdict (default 15)")

    demo = sub.add_parser("demo", help="run the gateway with the embedded demo on 127.0.0.1; "
                                       "any port 0 = a free one, printed in the banner")
    demo.add_argument("--port", type=int, default=8080, metavar="PORT",
                      help="the client listener (default 8080)")
    demo.add_argument("--transport-port", type=int, default=9100, metavar="PORT",
                      help="where the demo services dial in (default 9100)")
    demo.add_argument("--authority-port", type=int, default=8400, metavar="PORT",
                      help="the development Authority (default 8400)")
    demo.add_argument("--admin-port", type=int, default=9090, metavar="PORT",
                      help="the admin listener: probes, /metrics, OpenAPI (default 9090)")

    dsvc = sub.add_parser("demo-service", help="run one demo microservice")
    dsvc.add_argument("--name", required=True, choices=("scanner", "policy", "bench"))
    dsvc.add_argument("--gateway", action="append", metavar="HOST:PORT",
                      help="gateway transport address (repeatable; default 127.0.0.1:9100)")
    dsvc.add_argument("--region", default="local")
    dsvc.add_argument("--version", dest="svc_version", default="1.0.0", metavar="SEMVER")

    from .devauth.cli import add_call_arguments, add_dev_authority_arguments
    add_dev_authority_arguments(sub.add_parser(
        "dev-authority", help="run the development Authority (OIDC issuer; never in production)"))
    add_call_arguments(sub.add_parser(
        "call", help="send a request with an access token and a DPoP proof"))

    ws = sub.add_parser("ws", help="open a WebSocket, send each MESSAGE, print what comes back")
    ws.add_argument("url", metavar="URL")
    ws.add_argument("messages", nargs="*", metavar="MESSAGE")
    ws.add_argument("--wait", type=float, default=1.0, metavar="SECONDS",
                    help="how long to wait for answers after the last message")
    ws.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                    help="how long connecting and the upgrade may take (default 10)")

    check = sub.add_parser("check-config", help="validate a configuration and print it, secrets masked")
    check.add_argument("file", metavar="FILE")
    return p


def _load(path):
    from .config import default_settings, load_config
    return load_config(path) if path else default_settings()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .config import ConfigError, dump_effective
    from .listeners import ListenerError

    try:
        if args.command == "demo":
            from .demo import main as demo_main
            return demo_main(args.port, args.transport_port, args.authority_port, args.admin_port)
        if args.command in ("dev-authority", "call"):
            from .devauth.cli import run_call, run_dev_authority
            return (run_dev_authority if args.command == "dev-authority" else run_call)(args)
        if args.command == "ws":
            return _ws(args.url, args.messages, args.wait, args.timeout)
        if args.command == "demo-service":
            from .demo import run_service
            return run_service(args.name, args.gateway or ["127.0.0.1:9100"], args.region,
                               args.svc_version)
        if args.command == "reload":
            return _reload(args)
        if args.command == "check-config":
            settings = _load(args.file)
            # The certificates too, as serve loads them before it listens: a missing,
            # unreadable or mismatched file passed check-config and then stopped serve.
            from .ingress.tls import TlsConfigError
            from .reload import check_certificates
            try:
                check_certificates(settings)
            except TlsConfigError as exc:
                print(f"stellagw: configuration error: {exc}", file=sys.stderr)
                return 2
            sys.stdout.write(dump_effective(settings))
            return 0
        settings = _apply_overrides(_load(args.config), args)
    except ConfigError as exc:
        print(f"stellagw: configuration error: {exc}", file=sys.stderr)
        return 2
    except ListenerError as exc:   # `demo` binds its ports too
        print(f"stellagw: {exc}", file=sys.stderr)
        return 2

    if args.command == "serve":
        from .ingress.tls import TlsConfigError
        from .reload import ConfigSource
        from .supervisor import serve
        # A reload reads the same file with the same command-line overrides.
        source = ConfigSource(args.config, settings, lambda s: _apply_overrides(s, args),
                              pid_file=os.path.abspath(args.pid_file) if args.pid_file else None)
        try:
            return serve(settings, source)
        except (TlsConfigError, ConfigError) as exc:
            print(f"stellagw: configuration error: {exc}", file=sys.stderr)
            return 2
        except ListenerError as exc:
            # Nothing listens yet: the configuration names a port this host cannot give.
            print(f"stellagw: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"stellagw: cannot start: {exc}", file=sys.stderr)
            return 1
    return 2


def _reload(args) -> int:
    """SIGHUP to the gateway; with a pid file, wait for its verdict (written beside it)."""
    from .reload import read_status
    pid = args.pid
    if args.pid_file:
        try:
            with open(args.pid_file) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError) as exc:
            print(f"stellagw reload: cannot read a process id from {args.pid_file}: {exc}",
                  file=sys.stderr)
            return 1
    # Verdicts are numbered per gateway process; one from a process before it is no answer.
    status = read_status(args.pid_file) if args.pid_file else None
    before = status["seq"] if status and status.get("pid") == pid else 0
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"stellagw reload: no process {pid}"
              + (f" (a stale {args.pid_file}?)" if args.pid_file else ""), file=sys.stderr)
        return 1
    except PermissionError:
        print(f"stellagw reload: not allowed to signal process {pid}", file=sys.stderr)
        return 1
    if not args.pid_file:
        print(f"stellagw reload: SIGHUP sent to {pid}; its log says what it did")
        return 0
    deadline = time.monotonic() + args.timeout
    while True:
        status = read_status(args.pid_file)
        if status is not None and status.get("pid") == pid and status.get("seq", 0) > before:
            break
        if time.monotonic() >= deadline:
            print(f"stellagw reload: SIGHUP sent to {pid}, but no verdict within "
                  f"{args.timeout:g} s; see its log", file=sys.stderr)
            return 1
        time.sleep(0.05)
    result = status["result"]
    if result == "invalid":
        print(f"stellagw reload: configuration error: {status['key']}: {status['reason']} "
              f"(refused; still running configuration {status.get('configHash', '?')})",
              file=sys.stderr)
        return 2
    changed = ", ".join(status.get("changed") or ()) or "nothing"
    print(f"stellagw reload: {result}: configuration {status['configHash']}; applied: {changed}")
    if status.get("restartRequired"):
        print("stellagw reload: restart required for: " + ", ".join(status["restartRequired"])
              + " (not applied)", file=sys.stderr)
    return 0


def _ws(url: str, messages: list[str], wait: float, timeout: float = 10.0) -> int:
    """A tiny WebSocket client (picows) for trying the demo's WebSocket endpoint."""
    import asyncio

    from picows import WSListener, WSMsgType, ws_connect

    from .devauth.client import failure_reason

    if not url.lower().startswith(("ws://", "wss://")):
        print(f"stellagw ws: {url}: not a ws:// or wss:// URL", file=sys.stderr)
        return 2

    class Printer(WSListener):
        def on_ws_frame(self, transport, frame):
            if frame.msg_type == WSMsgType.CLOSE:
                print(f"(closed {frame.get_close_code()})")
                transport.disconnect()
            elif frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY):
                print(frame.get_payload_as_bytes().decode("utf-8", "replace"), flush=True)

    async def main():
        # picows bounds the upgrade, not the TCP connect: a dropped SYN would hang.
        transport, _ = await asyncio.wait_for(
            ws_connect(Printer, url, websocket_handshake_timeout=timeout), timeout)
        await asyncio.sleep(0.2)
        for message in messages:
            transport.send(WSMsgType.TEXT, message.encode())
            await asyncio.sleep(0.05)
        await asyncio.sleep(wait)
        transport.send_close()
        transport.disconnect()

    try:
        asyncio.run(main())
    except Exception as exc:  # refused, timed out, TLS, an upgrade answered without 101
        print(f"stellagw ws: {url}: {failure_reason(exc, timeout)}", file=sys.stderr)
        return 1
    return 0


def _apply_overrides(settings, args):
    from .config import ConfigError
    gw = settings.gateway
    if getattr(args, "workers", None) is not None:
        if not 0 <= args.workers <= 256:
            raise ConfigError("--workers", "must be between 0 and 256")
        gw = dataclasses.replace(gw, node=dataclasses.replace(gw.node, workers=args.workers))
    if getattr(args, "port", None) is not None:
        if not 0 <= args.port <= 65535:
            raise ConfigError("--port", "must be between 0 and 65535")
        gw = dataclasses.replace(gw, http=dataclasses.replace(gw.http, port=args.port))
    return dataclasses.replace(settings, gateway=gw)


if __name__ == "__main__":
    sys.exit(main())
