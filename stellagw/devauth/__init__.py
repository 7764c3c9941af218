"""Development Authority and DPoP client — DEVELOPMENT AND TESTS ONLY, never production.

    from stellagw.devauth import DevAuthority, DpopKey, fetch_token, call

    auth = DevAuthority(port=0).start_in_thread()      # or: async with DevAuthority() as auth
    key = DpopKey.generate()
    tok = fetch_token(auth.token_endpoint, "demo-client", "demo-secret", dpop_key=key)
    status, headers, body = call(url, token=tok["access_token"], dpop_key=key)
    auth.stop()

See docs/dev-authority.md.
"""
from .authority import Authority, Client, SigningKey, TokenError, default_clients, load_clients
from .client import (DpopKey, RequestFailed, TokenRequestError, call, discover, fetch_token,
                     htu_of, premint)
from .jose import access_token_hash, cert_thumbprint, jwk_thumbprint, verify_proof
from .server import DevAuthority, run

__all__ = ["Authority", "Client", "DevAuthority", "DpopKey", "SigningKey", "TokenError",
           "TokenRequestError", "access_token_hash", "call", "cert_thumbprint",
           "default_clients", "discover", "fetch_token", "htu_of", "jwk_thumbprint",
           "load_clients", "premint", "RequestFailed", "run", "verify_proof"]
