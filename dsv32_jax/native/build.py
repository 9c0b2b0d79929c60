"""Compile `gemv.cc` once per (source, jaxlib, compiler flags, CPU) into the cache directory and
register its handlers with XLA for the CPU platform.

The library is built for this CPU (`-march=native`), so its file name carries a hash of the
source, the jaxlib version, the flags and the CPU's feature flags. A build goes to a temporary
name and is renamed into place: a run stopped mid-build leaves no library that looks complete.
`DSV32_NATIVE=0` turns the kernels off; `DSV32_CXX` names the compiler (default `c++`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile

import jax

from dsv32_jax.cachedir import cache_dir

SOURCE = os.path.join(os.path.dirname(__file__), "gemv.cc")
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno"]
TARGETS = ("dsv32_gemv_e4m3", "dsv32_gemv_bf16")


class NativeUnavailable(OSError):
    """The native kernels could not be built or loaded on this host (the message says why): an
    environment error, as a missing file is (the CLI prints it in one line)."""


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def library_path(cxx: str) -> str:
    with open(SOURCE, "rb") as f:
        src = f.read()
    key = hashlib.sha256(b"\0".join([src, jax.lib.__version__.encode(), cxx.encode(),
                                     " ".join(FLAGS).encode(), _cpu_flags().encode()]))
    return os.path.join(cache_dir(), "native", f"gemv-{key.hexdigest()[:16]}.so")


def _compile(cxx: str, out: str) -> None:
    if shutil.which(cxx) is None:
        raise NativeUnavailable(f"no C++ compiler {cxx!r} on PATH (set DSV32_CXX)")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(out))
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), SOURCE, "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise NativeUnavailable(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-1000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_REGISTERED: list[str] = []  # the library whose handlers XLA holds (once per process)


@functools.cache
def _load() -> tuple[bool, str]:
    """(available, why not); cached: `_load.cache_clear()` decides again (tests)."""
    if os.environ.get("DSV32_NATIVE", "1") == "0":
        return False, "DSV32_NATIVE=0"
    if _REGISTERED:
        return True, ""
    cxx = os.environ.get("DSV32_CXX", "c++")
    try:
        path = library_path(cxx)
        if not os.path.exists(path):
            _compile(cxx, path)
        lib = ctypes.CDLL(path)
        for name in TARGETS:
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    except OSError as e:  # NativeUnavailable included
        return False, str(e)
    _REGISTERED.append(path)
    return True, ""


def available() -> bool:
    """Whether the native CPU kernels are built and registered (builds them on the first call)."""
    return _load()[0]


def why_not() -> str:
    """Why `available()` is False ('' when it is True)."""
    return _load()[1]


def require() -> None:
    """Raise NativeUnavailable unless the kernels are available."""
    ok, why = _load()
    if not ok:
        raise NativeUnavailable(f"the native CPU kernels are unavailable: {why}")
