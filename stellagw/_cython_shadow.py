"""The `cython` names the glue modules use (ingress/http.py, transport/connection.py), for
running them uncompiled where Cython is not installed: the decorators change nothing then."""


def freelist(size):
    return lambda cls: cls


def cclass(cls):
    return cls
