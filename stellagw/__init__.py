"""stellagw — the Stella Ops Gateway."""

# Before any compiled module is imported: STELLAGW_NO_EXTENSIONS=1 must take effect for
# the glue modules too (stellagw/_impl.py).
from . import _impl  # noqa: F401

__version__ = "0.1.0"
__all__ = ["__version__"]
