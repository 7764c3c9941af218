"""What the tests share: a gateway in a thread or a process (gwtest), a worker's request path
without sockets on a loop the test drives (sansio), SDK services run as processes
(services, services_feed), a raw service peer (servicepeer), real valkey-server processes
(valkey_server: fixtures registered by tests/conftest.py), signing keys, tokens and DPoP
proofs (auth), and the compiled/twin pairs of the codecs (impls)."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]    # the checkout: tests/support/ is two below
