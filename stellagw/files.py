"""Small files the processes of one gateway share (the run directory, the pid file)."""
from __future__ import annotations

import os


def replace_atomically(path: str, data: bytes) -> None:
    """Write `data` as `path`: a reader sees the old file or the new one, never half of one.
    The temporary name carries the pid, so processes writing the same path never share it."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
