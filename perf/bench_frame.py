"""Frame codec throughput: compiled codec vs pure-Python twin, same run, same frames.

For REQUEST and RESPONSE frames shaped like the gateway's hot path (a GET with the identity
and tracing headers the gateway adds; a small JSON response), measures for each codec:

  encode   FrameEncoder.request()/response() per frame, take() once per batch
           (the transport coalesces one loop iteration's frames into one write)
  decode   feed() one batch, then next() + decode_request()/decode_response() per frame
  forward  what the gateway does per routed request instead: REQUEST straight from the
           client's headers (FrameEncoder.request_forward), RESPONSE to the client's header
           block (decode_response_block); each beside the Python-list path it replaced
           (transport/headers.py request_headers() + request(), decode_response() +
           response_header_block())

and prints frames per second and ns per frame, each measured for about --duration seconds.
The two codecs are checked to produce identical bytes first.

    make build
    python -m perf bench-frame                       # both codecs, ~2 s per figure
    python -m perf bench-frame --only c --duration 10 --body 4096
    perf record -g python -m perf bench-frame --only c --duration 10   # then: perf report
"""
from __future__ import annotations

import argparse
import importlib
import time

from stellagw._py import frame as py_frame
from stellagw.transport.headers import (CLASSES, RESPONSE_DROP_NAMES, classify,
                                        request_headers, response_header_block)

from . import commands

PREFIX = bytes.fromhex("5a17c0de2f6b9e41")
REQ_HEADERS = [
    (b"host", b"api.example.com"),
    (b"user-agent", b"k6/0.52.0 (https://k6.io/)"),
    (b"accept", b"application/json"),
    (b"x-correlation-id", b"0f8fad5b-d9cb-469f-a165-70867728950e"),
    (b"x-stellaops-tenant", b"tenant-a"),
    (b"x-stellaops-actor", b"user:alice"),
    (b"x-stellaops-scopes", b"scans.read scans.write"),
    (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
]
# What a client sends (forwarded: 4 of them) and the identity the gateway adds.
CLIENT_HEADERS = [
    (b"host", b"api.example.com"),
    (b"user-agent", b"k6/0.52.0 (https://k6.io/)"),
    (b"accept", b"application/json"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"connection", b"keep-alive"),
    (b"authorization", b"DPoP eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln"),
    (b"dpop", b"eyJ0eXAiOiJkcG9wK2p3dCJ9.eyJodG0iOiJHRVQifQ.c2ln"),
    (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
]
IDENTITY = [(b"x-stellaops-tenant", b"tenant-a"), (b"x-stellaops-actor", b"user:alice"),
            (b"x-stellaops-scopes", b"scans.read scans.write")]
CID = "0f8fad5b-d9cb-469f-a165-70867728950e"
RESP_HEADERS = [
    (b"content-type", b"application/json"),
    (b"cache-control", b"no-store"),
    (b"x-correlation-id", b"0f8fad5b-d9cb-469f-a165-70867728950e"),
]


def corrs(n):
    return [PREFIX + i.to_bytes(8, "big") for i in range(1, n + 1)]


def encode_requests(m, ids, body):
    enc = m.FrameEncoder()
    request = enc.request
    for corr in ids:
        request(corr, "GET", "/api/v1/scans/12345/results", b"page=2&size=50", REQ_HEADERS,
                30000, 1, body)
    return enc.take()


def encode_responses(m, ids, body):
    enc = m.FrameEncoder()
    response = enc.response
    for corr in ids:
        response(corr, 200, RESP_HEADERS, 1, body)
    return enc.take()


def decode_batch(m, data, decode):
    dec = m.FrameDecoder()
    dec.feed(data)
    nxt = dec.next
    n = 0
    while (frame := nxt()) is not None:
        decode(frame[2])
        n += 1
    return n


def measure(fn, batch, duration):
    """Frames per second of fn() (which handles `batch` frames), over ~duration seconds."""
    fn()                                   # warm up
    frames = 0
    start = time.perf_counter()
    deadline = start + duration
    while True:
        for _ in range(10):
            fn()
        frames += 10 * batch
        now = time.perf_counter()
        if now >= deadline:
            return frames / (now - start)


def bench(m, args):
    ids = corrs(args.batch)
    req_body = b"x" * args.body
    resp_body = (b'{"id":12345,"status":"done","findings":3}' + b" " * max(0, args.body - 42))
    enc_req = m.FrameEncoder()
    enc_resp = m.FrameEncoder()
    req_data = encode_requests(m, ids, req_body)
    resp_data = encode_responses(m, ids, resp_body)

    def e_req():
        request = enc_req.request
        for corr in ids:
            request(corr, "GET", "/api/v1/scans/12345/results", b"page=2&size=50",
                    REQ_HEADERS, 30000, 1, req_body)
        enc_req.take()

    def e_resp():
        response = enc_resp.response
        for corr in ids:
            response(corr, 200, RESP_HEADERS, 1, resp_body)
        enc_resp.take()

    client = ClientRequest()

    def f_req_list():
        request = enc_req.request
        for corr in ids:
            request(corr, "GET", "/api/v1/scans/12345/results", b"page=2&size=50",
                    request_headers(client, b"10.1.2.3", b"https", IDENTITY), 30000, 1,
                    req_body)
        enc_req.take()

    def f_req():
        forward = enc_req.request_forward
        for corr in ids:
            forward(corr, "GET", "/api/v1/scans/12345/results", b"page=2&size=50",
                    CLIENT_HEADERS, 30000, 1, req_body, CLASSES, classify, True, True, IDENTITY,
                    b"10.1.2.3", b"https", CID)
        enc_req.take()

    def f_resp_list(payload):
        flags, status, headers, body = m.decode_response(payload)
        return response_header_block(headers)

    return {
        "REQUEST encode": measure(e_req, args.batch, args.duration),
        "REQUEST decode": measure(lambda: decode_batch(m, req_data, m.decode_request),
                                  args.batch, args.duration),
        "RESPONSE encode": measure(e_resp, args.batch, args.duration),
        "RESPONSE decode": measure(lambda: decode_batch(m, resp_data, m.decode_response),
                                   args.batch, args.duration),
        "REQUEST list": measure(f_req_list, args.batch, args.duration),
        "REQUEST forward": measure(f_req, args.batch, args.duration),
        "RESPONSE list": measure(lambda: decode_batch(m, resp_data, f_resp_list),
                                 args.batch, args.duration),
        "RESPONSE block": measure(
            lambda: decode_batch(m, resp_data,
                                 lambda p: m.decode_response_block(p, RESPONSE_DROP_NAMES)),
            args.batch, args.duration),
    }, len(req_data) // args.batch, len(resp_data) // args.batch


class ClientRequest:
    """The attributes of an ingress request that request_headers() reads."""
    headers = CLIENT_HEADERS
    http_version = "1.1"
    correlation_id = CID


def main(argv: list[str]):
    ap = argparse.ArgumentParser(prog=commands.prog(__name__), description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=2.0, help="seconds per figure (2)")
    ap.add_argument("--batch", type=int, default=64,
                    help="frames per feed()/take(), i.e. per loop iteration (64)")
    ap.add_argument("--body", type=int, default=0, help="request body bytes; response body "
                    "is max(42, this) (0)")
    ap.add_argument("--only", choices=["c", "py"], help="measure one codec only")
    args = ap.parse_args(argv)

    codecs = []
    if args.only != "py":
        try:
            codecs.append(("cython", importlib.import_module("stellagw._cext.frame")))
        except ImportError as exc:
            print(f"compiled codec not available ({exc}); run python setup.py build_ext --inplace")
            if args.only == "c":
                return 1
    if args.only != "c":
        codecs.append(("python", py_frame))
    if len(codecs) == 2:
        ids = corrs(4)
        for fn in (encode_requests, encode_responses):
            if fn(codecs[0][1], ids, b"abc") != fn(codecs[1][1], ids, b"abc"):
                print("the codecs disagree: run tests/codecs/test_frame.py")
                return 1

    results = {}
    for name, m in codecs:
        results[name], req_size, resp_size = bench(m, args)
    print(f"frame codec, batch {args.batch}, REQUEST {req_size} B ({len(REQ_HEADERS)} headers), "
          f"RESPONSE {resp_size} B, ~{args.duration:g} s per figure")
    names = [n for n, _ in codecs]
    head = f"{'':16}" + "".join(f"{n + ' frames/s':>20}{'ns/frame':>10}" for n in names)
    if len(names) == 2:
        head += f"{'speed-up':>10}"
    print(head)
    for op in results[names[0]]:
        line = f"{op:16}"
        for n in names:
            rate = results[n][op]
            line += f"{rate:>20,.0f}{1e9 / rate:>10,.0f}"
        if len(names) == 2:
            line += f"{results[names[0]][op] / results[names[1]][op]:>9.1f}x"
        print(line)
    return 0

