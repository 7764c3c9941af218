# C types for stellagw/auth/dpop.py when compiled (docs/hot-path.md): the proof key cache and
# the verifier are extension types with struct fields, the cache's steps are C calls from
# check(). What Python code and the tests read stays readable: ProofResult's fields,
# DpopVerifier.key_cache and .nonces, ProofKeyCache.capacity. verify_signature and
# public_key_from_jwk are not declared here: they stay module globals a test can replace.
cimport cython

cdef Py_ssize_t _MAX_JTI_CHARS
cdef long _REPLAY_GRACE_MS
cdef object _sha256, _split, _decode, _json_object, _b64url

cdef object _refuse(message, reason)
cdef str _text(dict claims, name)


@cython.final
cdef class ProofResult:
    cdef public object jkt, replay_key, ttl_ms, nonce_age


@cython.final
cdef class _Key:
    cdef bytes header
    cdef str alg, jkt
    cdef object key
    cdef bint used


@cython.final
cdef class ProofKeyCache:
    cdef readonly Py_ssize_t capacity
    cdef dict _by_header, _by_jkt
    cdef list _ring
    cdef Py_ssize_t _hand

    @cython.locals(entry=_Key)
    cpdef list thumbprints(self)
    cdef _Key get(self, bytes header)
    @cython.locals(entry=_Key)
    cdef object key(self, jkt)
    @cython.locals(entry=_Key, old=_Key, ring=list, hand=Py_ssize_t)
    cdef passed(self, bytes header, str alg, key, str jkt)


@cython.final
cdef class DpopVerifier:
    cdef frozenset _algorithms
    cdef double _skew
    cdef Py_ssize_t _max_bytes
    cdef public object nonces
    cdef readonly ProofKeyCache key_cache

    @cython.locals(header=dict)
    cdef tuple _header(self, bytes segment)
    @cython.locals(parts=tuple, h=bytes, p=bytes, s=bytes, known=_Key, alg=str, jkt=str,
                   signature=bytes, claims=dict, jti=str, htm=str, htu=str, proof_ath=str,
                   skew=double)
    cpdef ProofResult check(self, bytes proof, method, expected_htu, str ath, str bound_jkt,
                            double now)
