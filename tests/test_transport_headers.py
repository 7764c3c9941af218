"""What crosses from HTTP into a REQUEST frame, and back."""
from __future__ import annotations

from stellagw.transport.headers import request_headers, response_header_block


class Req:
    def __init__(self, headers, http_version="1.1"):
        self.headers = headers
        self.http_version = http_version
        self.correlation_id = "cid-1"


def test_request_headers_drop_hop_by_hop_spoofed_identity_and_gateway_owned():
    req = Req([(b"host", b"gw.example"), (b"connection", b"keep-alive, x-custom, x-stellaops-actor"),
               (b"keep-alive", b"timeout=5"), (b"x-custom", b"named-by-connection"),
               (b"x-stellaops-tenant", b"spoofed"), (b"x_stellaops_actor", b"underscored"),
               (b"x-forwarded-for", b"10.9.9.9"), (b"te", b"trailers"), (b"upgrade", b"h2c"),
               (b"accept", b"application/json"), (b"traceparent", b"00-abc")])
    ours = [(b"x-stellaops-actor", b"demo-client"), (b"x-stellaops-tenant", b"tenant-1")]
    out = request_headers(req, b"127.0.0.1", b"https", ours)
    assert out == [
        (b"host", b"gw.example"), (b"accept", b"application/json"), (b"traceparent", b"00-abc"),
        (b"te", b"trailers"),
        (b"x-stellaops-actor", b"demo-client"), (b"x-stellaops-tenant", b"tenant-1"),
        (b"x-forwarded-for", b"127.0.0.1"), (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"gw.example"), (b"x-correlation-id", b"cid-1")]
    no_trace = request_headers(req, b"127.0.0.1", b"https", ours, keep_trace=False)
    assert (b"traceparent", b"00-abc") not in no_trace


def test_response_header_block_drops_framing_headers():
    block = response_header_block([(b"content-type", b"text/plain"), (b"content-length", b"9"),
                                   (b"transfer-encoding", b"chunked"), (b"x-a", b"1")])
    assert block == b"content-type: text/plain\r\nx-a: 1\r\n"
