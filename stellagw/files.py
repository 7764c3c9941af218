"""Small files the processes of one gateway share (the run directory, the pid file)."""
from __future__ import annotations

import errno
import os
import stat

# Configuration files and certificates are kilobytes (a Kubernetes ConfigMap or Secret is at
# most 1 MiB; a public CA bundle about 220 KB).
MAX_READ = 4 * 1024 * 1024


def replace_atomically(path: str, data: bytes) -> None:
    """Write `data` as `path`: a reader sees the old file or the new one, never half of one.
    The temporary name carries the pid, so processes writing the same path never share it."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_regular(path: str, limit: int = MAX_READ) -> bytes:
    """The bytes of `path`, which must be a regular file of at most `limit` bytes, else
    OSError. Opened without blocking and checked before it is read: a FIFO put where a
    certificate was made the worker's file watch (or a reload) wait in open() on its loop
    for good, every client with it; a device such as /dev/zero would be read for ever."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:                    # it grew after the check
        raise OSError(errno.EFBIG, f"larger than {limit} bytes")
    return b"".join(chunks)
