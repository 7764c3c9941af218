"""Measurement only (the scorecard's auth part): a gateway started with this directory on
PYTHONPATH checks every DPoP proof except its signature, so its CPU per request minus an
unauthenticated request's is "everything but the signature" measured directly, rather
than by subtracting an ES256 verification timed in another process. Never used otherwise:
nothing in stellagw refers to it.
"""
import stellagw.auth.dpop as _dpop

# a module global of stellagw/auth/dpop.py, which check() looks up on every call, compiled too
_dpop.verify_signature = lambda alg, key, signing_input, signature: True
