"""When the frames encoded into a connection's FrameEncoder are written: one helper for both
ends of a service link (the gateway's ServiceConnection, the SDK's link).

The frames produced in one loop iteration go out in one write (one syscall, one wake-up of
the peer); after frame.WRITE_BATCH frames, or frame.WRITE_BATCH_BYTES bytes, the batch is
written at once, so the peer starts on a burst while the rest is produced (the reasons and
the figures are at WRITE_BATCH in frame.py and in docs/hot-path.md)::

    batch = WriteBatch(encoder, loop, flush)   # flush(): the owner's; it calls batch.write()
    encoder.request(...)                       # any frame encoded, then
    batch.added()                              # writes now, or once this iteration is over

    def flush():                               # the owner's: it knows whether it may write
        batch.write(transport if open else None)   # True: something was written

One source, compiled (typed through batch.pxd, so the ServiceConnection calls it as C) and
run as plain Python under STELLAGW_NO_EXTENSIONS=1.
"""
from .frame import WRITE_BATCH, WRITE_BATCH_BYTES

_WRITE_BATCH = WRITE_BATCH
_WRITE_BATCH_BYTES = WRITE_BATCH_BYTES


class WriteBatch:
    def __init__(self, encoder, loop, flush):
        self.encoder = encoder          # the connection's FrameEncoder
        self._loop = loop
        self._flush = flush             # the owner's: called now, or soon, to write
        self._scheduled = False         # a flush is waiting for the end of this iteration
        self._unwritten = 0             # frames encoded since the last write

    def added(self):
        """One more frame was encoded: write now (a full batch) or once this iteration ends."""
        self._unwritten += 1
        if self._unwritten >= _WRITE_BATCH or len(self.encoder) >= _WRITE_BATCH_BYTES:
            self._flush()               # a burst: let the peer start on it
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def write(self, transport):
        """Write what is encoded to `transport` (None: the link is gone, nothing is written).
        True when something was written."""
        self._scheduled = False
        self._unwritten = 0
        if len(self.encoder) and transport is not None:
            transport.write(self.encoder.take())
            return True
        return False
