"""onnxruntime's ARM64 CPU build, run on an x86 Linux machine under qemu-user emulation.

Phones run onnxruntime's ARM64 CPU kernels (MLAS's NEON code paths), not the x86 ones the harness
times. This module prepares, once, a cached ARM64 runtime and runs models in it:

- :func:`setup` builds the runtime in a cache directory, step by step (each step says what it does
  and is skipped when already done): qemu-user, an arm64 sysroot with Debian's Python 3.11, the
  aarch64 wheels of onnxruntime and numpy, precompiled bytecode, and a smoke test;
- :func:`check` says whether the runtime is ready, changing nothing;
- :func:`run_models_arm64` runs models inside the emulated runtime on given inputs, through a small
  runner script written to a temporary directory; arrays go in and out as ``.npz`` files;
- :func:`arm64_section` builds the ``"arm64"`` section of ``onnx-lowrank bench --arm64``.

Only outputs and operator coverage are real under emulation. Run times are not: qemu translates
every ARM instruction into several x86 ones, on a different memory system, so an emulated time
says nothing about a phone's latency and is never reported as latency.

The sysroot is downloaded with a *private* apt state inside the cache (its own package lists,
Debian bookworm's arm64 archive): the system's apt configuration (``dpkg --add-architecture``) is
not touched, and that step needs no root. Only installing qemu-user-static, when it is missing,
needs root.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Any, Callable, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "ARM64_TOLERANCE",
    "NUMPY_VERSION",
    "ORT_VERSION",
    "PYTHON_VERSION",
    "Readiness",
    "SetupError",
    "arm64_section",
    "check",
    "compare_arm64_x86",
    "default_cache",
    "find_qemu",
    "run_models_arm64",
    "section_failures",
    "setup",
]

#: onnxruntime version installed in the ARM64 runtime. 1.32.0 segfaults at import under Debian
#: bookworm's qemu 7.2; 1.22.1 and 1.19.2 were seen working (measured here).
ORT_VERSION = "1.22.1"
#: numpy version installed next to it (the one the runtime was tested with).
NUMPY_VERSION = "2.4.6"
#: The Python of the sysroot: Debian bookworm ships 3.11, so the wheels are the cp311 ones.
PYTHON_VERSION = "3.11"
#: The Debian release the sysroot packages come from (any Debian/Ubuntu host can fetch them).
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SECURITY = "http://deb.debian.org/debian-security"
_DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

#: arm64 packages of the sysroot: Python 3.11 and every shared library it and onnxruntime's
#: aarch64 wheel load (libgomp for numpy/onnxruntime's OpenMP-built pieces, libstdc++ for
#: onnxruntime). Found by running the runtime until nothing was missing (DESIGN.md).
SYSROOT_PACKAGES = (
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6", "zlib1g",
    "libexpat1", "libffi8", "libssl3", "libbz2-1.0", "liblzma5", "libgcc-s1", "libstdc++6",
    "libsqlite3-0", "libuuid1", "libncursesw6", "libtinfo6", "libreadline8", "libdb5.3", "libgomp1",
)

#: Outputs of a model on ARM64 and on x86 "match" when ``max_abs <= atol + rtol * max|x86|``.
#: The two builds run different kernels (NEON vs AVX2/AVX-512 GEMM blocking, different summation
#: order, their own exp/tanh approximations), which moves float32 results by a few ulps per
#: operation (1e-7..1e-6 relative measured on small models and a real classifier); rtol 1e-4 leaves
#: ~100x headroom over that while a wrong or missing kernel shows up as O(1e-1). float16 keeps 10
#: mantissa bits instead of 23, hence its looser tolerance. Integer and bool outputs must be equal.
ARM64_TOLERANCE: dict[str, tuple[float, float]] = {  # dtype -> (rtol, atol)
    "float64": (1e-9, 1e-12),
    "float32": (1e-4, 1e-6),
    "float16": (1e-2, 1e-3),
}

#: Default samples per model under emulation: outputs are compared element by element, so a few
#: samples settle agreement; each costs one emulated run (~10-100x slower than native).
DEFAULT_SAMPLES = 4
#: Wall-clock limit of one emulated job: interpreter start + onnxruntime import take ~3 s, a small
#: model run well under a second, a 20 MB CNN a few seconds per sample; 15 minutes means "hung".
DEFAULT_TIMEOUT_S = 900.0

_MARKER = "runtime.json"
_COMPLETE = ".complete"
_STEPS = 5


class SetupError(RuntimeError):
    """A setup step that cannot proceed; the message is one line saying what to run."""


@dataclasses.dataclass(frozen=True)
class Readiness:
    """Whether the ARM64 runtime in a cache directory is ready (see :func:`check`)."""

    ready: bool
    reason: str | None
    cache: pathlib.Path
    qemu: str | None = None
    onnxruntime: str | None = None
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# locations
# --------------------------------------------------------------------------------------------


def default_cache() -> pathlib.Path:
    """The cache directory: ``$ONNX_LOWRANK_ARM64_CACHE``, else ``~/.cache/onnx-lowrank/arm64``
    (``$XDG_CACHE_HOME`` replaces ``~/.cache`` when set)."""
    env = os.environ.get("ONNX_LOWRANK_ARM64_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "onnx-lowrank" / "arm64"


def _cache_dir(cache: str | os.PathLike[str] | None) -> pathlib.Path:
    return pathlib.Path(os.fspath(cache)).expanduser().resolve() if cache is not None else default_cache().resolve()


def _sysroot(cache: pathlib.Path) -> pathlib.Path:
    return cache / "sysroot"


def _site(cache: pathlib.Path) -> pathlib.Path:
    return cache / "site"


def _python(cache: pathlib.Path) -> pathlib.Path:
    return _sysroot(cache) / "usr" / "bin" / f"python{PYTHON_VERSION}"


def _cached_qemu(cache: pathlib.Path) -> pathlib.Path:
    return cache / "qemu" / "qemu-aarch64-static"


def find_qemu(cache: str | os.PathLike[str] | None = None) -> str | None:
    """The qemu-user binary for aarch64: the one setup put in the cache, else ``qemu-aarch64-static``
    (or ``qemu-aarch64``) on ``PATH``; None when there is none."""
    cached = _cached_qemu(_cache_dir(cache))
    if os.access(cached, os.X_OK):
        return str(cached)
    for name in ("qemu-aarch64-static", "qemu-aarch64"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _qemu_version(qemu: str) -> str:
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.splitlines()[0].strip() if out else "unknown"


def _read_marker(cache: pathlib.Path) -> dict[str, Any] | None:
    try:
        return json.loads((cache / _MARKER).read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# readiness
# --------------------------------------------------------------------------------------------


def check(cache: str | os.PathLike[str] | None = None, *, probe: bool = False) -> Readiness:
    """Whether the ARM64 runtime is ready; changes nothing.

    Parameters
    ----------
    cache : path-like, optional
        The cache directory (default :func:`default_cache`).
    probe : bool, default False
        Also start the emulated interpreter and import onnxruntime (~3 s), instead of trusting
        the marker the last successful setup wrote.

    Returns
    -------
    Readiness
        ``ready``; when not ready, ``reason`` is one line ending with what to run.
    """
    root = _cache_dir(cache)
    fix = "run: onnx-lowrank arm64-setup" + ("" if cache is None else f" --cache {root}")
    qemu = find_qemu(root)
    if qemu is None:
        return Readiness(False, f"qemu-user is missing (none in {root / 'qemu'}, no qemu-aarch64-static on PATH); {fix}",
                         root)
    marker = _read_marker(root)
    if marker is None:
        what = "is empty" if not root.exists() or not any(root.iterdir()) else "has no finished setup"
        return Readiness(False, f"the ARM64 runtime cache {root} {what}; {fix}", root, qemu=qemu)
    missing = [p for p in (_python(root), _site(root) / "onnxruntime", _site(root) / "numpy") if not p.exists()]
    if missing:
        return Readiness(False, f"the ARM64 runtime in {root} is incomplete ({missing[0]} missing); {fix}", root, qemu=qemu)
    if marker.get("onnxruntime") != ORT_VERSION or marker.get("numpy") != NUMPY_VERSION:
        return Readiness(
            False,
            f"the ARM64 runtime in {root} has onnxruntime {marker.get('onnxruntime')}, this version of "
            f"onnx-lowrank pins {ORT_VERSION}; {fix}",
            root,
            qemu=qemu,
        )
    if probe:
        try:
            got = _smoke_test(root, qemu)
        except SetupError as exc:
            return Readiness(False, f"{exc}; {fix}", root, qemu=qemu)
        marker = {**marker, **got}
    return Readiness(True, None, root, qemu=qemu, onnxruntime=marker.get("onnxruntime"), info=marker)


# --------------------------------------------------------------------------------------------
# setup
# --------------------------------------------------------------------------------------------


def setup(
    cache: str | os.PathLike[str] | None = None,
    *,
    say: Callable[[str], None] | None = None,
    install_qemu: bool = True,
    mirror: str | None = None,
) -> Readiness:
    """Prepare the cached ARM64 runtime. Idempotent: finished steps are skipped.

    Steps: (1) qemu-user: the system's, else Debian's static qemu-aarch64 binary fetched with
    ``apt-get download`` into the cache; (2) the arm64
    sysroot: Debian bookworm's arm64 Python 3.11 and its libraries, downloaded with a private apt
    state and unpacked with ``dpkg -x``; (3) the aarch64 cp311 wheels of onnxruntime
    :data:`ORT_VERSION` and numpy :data:`NUMPY_VERSION` (``pip download``), unpacked into a site
    directory; (4) precompiled bytecode (halves each emulated start); (5) a smoke test that imports
    onnxruntime under qemu and records the versions.

    Parameters
    ----------
    cache : path-like, optional
        Where the runtime lives (default :func:`default_cache`).
    say : callable, optional
        Receives one line per step (default: the module logger at INFO).
    install_qemu : bool, default True
        Fetch qemu-user-static with apt-get when missing (no root needed unless the system's
        package lists must be refreshed first).
    mirror : str, optional
        Debian mirror for the arm64 packages (default: the system's sources on a Debian bookworm
        host, else :data:`DEBIAN_MIRROR`).

    Returns
    -------
    Readiness

    Raises
    ------
    SetupError
        A step cannot proceed; the message is one line saying what to run.
    """
    say = say or logger.info
    root = _cache_dir(cache)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SetupError(f"cannot create the cache directory {root}: {exc.strerror}; pick another with --cache DIR") from exc

    say(f"[1/{_STEPS}] qemu-user: the emulator that runs aarch64 programs on this machine")
    qemu = _step_qemu(root, say, install_qemu)

    say(f"[2/{_STEPS}] arm64 sysroot: Debian {DEBIAN_SUITE}'s arm64 Python {PYTHON_VERSION} and the "
        f"{len(SYSROOT_PACKAGES)} library packages it and onnxruntime need, unpacked into {_sysroot(root)} "
        "(private apt state; the system's apt configuration is not changed)")
    _step_sysroot(root, say, mirror)

    say(f"[3/{_STEPS}] aarch64 wheels: onnxruntime {ORT_VERSION} and numpy {NUMPY_VERSION} for CPython "
        f"{PYTHON_VERSION} (pip download), unpacked into {_site(root)}")
    _step_wheels(root, say)

    say(f"[4/{_STEPS}] bytecode: precompile the sysroot's and wheels' Python files (each emulated start "
        "then imports onnxruntime in ~2.5 s instead of ~7 s)")
    _step_bytecode(root, qemu, say)

    say(f"[5/{_STEPS}] smoke test: start the arm64 Python under qemu and import onnxruntime")
    t0 = time.perf_counter()
    got = _smoke_test(root, qemu)
    marker = {
        "onnxruntime": got["onnxruntime"],
        "numpy": got["numpy"],
        "machine": got["machine"],
        "python": got["python"],
        "qemu": qemu,
        "qemu_version": _qemu_version(qemu),
        "packages": list(SYSROOT_PACKAGES),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _atomic_write(root / _MARKER, json.dumps(marker, indent=2) + "\n")
    say(f"      ok: onnxruntime {got['onnxruntime']} on {got['machine']} (Python {got['python']}), "
        f"{time.perf_counter() - t0:.1f} s per emulated start")
    return check(root)


def _run(cmd: Sequence[str], *, what: str, cwd: pathlib.Path | None = None, env: Mapping[str, str] | None = None,
         timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    logger.debug("running: %s", " ".join(cmd))
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, env=dict(env) if env is not None else None,
                              capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise SetupError(f"{what}: {cmd[0]} not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise SetupError(f"{what}: {cmd[0]} did not finish within {timeout:g} s") from exc
    if proc.returncode != 0:
        tail = " ".join((proc.stderr or proc.stdout).split())[-400:]
        raise SetupError(f"{what} failed ({' '.join(cmd[:3])} ... exit {proc.returncode}): {tail}")
    return proc


def _step_qemu(root: pathlib.Path, say: Callable[[str], None], install: bool) -> str:
    qemu = find_qemu(root)
    if qemu is not None:
        say(f"      already there: {qemu} ({_qemu_version(qemu)})")
        return qemu
    apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if apt is None or dpkg is None:
        raise SetupError("qemu-user is missing and there is no apt-get/dpkg-deb here; install your distribution's "
                         "qemu-user-static (e.g. dnf install qemu-user-static) and rerun onnx-lowrank arm64-setup")
    if not install:
        raise SetupError("qemu-user is missing; run: sudo apt-get install -y qemu-user-static "
                         "(then rerun onnx-lowrank arm64-setup)")
    # Debian's qemu-user-static is statically linked: its qemu-aarch64-static runs from any
    # directory, so it goes into the cache (nothing installed system-wide, no root needed)
    say("      fetching Debian's qemu-user-static package (apt-get download) and keeping its "
        f"qemu-aarch64-static in {root / 'qemu'}")
    t0 = time.perf_counter()
    opts = ["-o", "APT::Sandbox::User=root"] if _is_root() else []
    with tempfile.TemporaryDirectory(prefix="qemu_", dir=root) as tmp:
        work = pathlib.Path(tmp)
        try:
            _run([apt, *opts, "download", "-q", "qemu-user-static"], what="apt-get download qemu-user-static", cwd=work)
        except SetupError:
            if not _is_root():
                raise SetupError("apt-get cannot fetch qemu-user-static (package lists missing or stale); "
                                 "run: sudo apt-get update (or sudo apt-get install -y qemu-user-static), then "
                                 "rerun onnx-lowrank arm64-setup") from None
            say("      not in the system's package lists: running apt-get update (needs root) and retrying")
            _run([apt, "update", "-q"], what="apt-get update")
            _run([apt, *opts, "download", "-q", "qemu-user-static"], what="apt-get download qemu-user-static", cwd=work)
        deb = next(iter(sorted(work.glob("qemu-user-static_*.deb"))), None)
        if deb is None:
            raise SetupError(f"apt-get download left no qemu-user-static .deb in {work}")
        member = "./usr/bin/qemu-aarch64-static"
        proc = subprocess.run(f"{dpkg} --fsys-tarfile '{deb}' | tar -x -C '{work}' '{member}'",
                              shell=True, capture_output=True, text=True, timeout=600)
        binary = work / member
        if proc.returncode != 0 or not binary.is_file():
            raise SetupError(f"could not extract {member} from {deb.name}: {' '.join(proc.stderr.split())[-200:]}")
        target = _cached_qemu(root)
        target.parent.mkdir(exist_ok=True)
        binary.chmod(0o755)
        binary.replace(target)
    say(f"      done: {target} ({_qemu_version(str(target))}) in {time.perf_counter() - t0:.1f} s")
    return str(target)


def _host_is_bookworm() -> bool:
    try:
        text = pathlib.Path("/etc/os-release").read_text()
    except OSError:
        return False
    return "ID=debian" in text and f"VERSION_CODENAME={DEBIAN_SUITE}" in text


def _apt_options(apt_dir: pathlib.Path, mirror: str | None) -> list[str]:
    """apt-get options of a private, arm64-only apt state in ``apt_dir``."""
    opts = [
        f"Dir::State={apt_dir / 'state'}",
        f"Dir::State::status={apt_dir / 'status'}",
        f"Dir::Cache={apt_dir / 'cache'}",
        "APT::Architecture=arm64",
        "APT::Architectures::=arm64",
        "Debug::NoLocking=1",  # a private state: no system lock to take (and no root needed)
        "Acquire::Languages=none",
    ]
    if _is_root():
        opts.append("APT::Sandbox::User=root")  # the private directories belong to root, not _apt
    if mirror is not None or not _host_is_bookworm():
        # not a bookworm host (Ubuntu, trixie, ...), or an explicit mirror: our own sources list
        if not os.path.isfile(_DEBIAN_KEYRING):
            raise SetupError("the Debian archive keyring is missing (needed to verify the arm64 packages); "
                             "run: sudo apt-get install -y debian-archive-keyring")
        url = mirror or DEBIAN_MIRROR
        sources = apt_dir / "sources.list"
        lines = [
            f"deb [arch=arm64 signed-by={_DEBIAN_KEYRING}] {url} {DEBIAN_SUITE} main",
            f"deb [arch=arm64 signed-by={_DEBIAN_KEYRING}] {url} {DEBIAN_SUITE}-updates main",
        ]
        if mirror is None:
            lines.append(f"deb [arch=arm64 signed-by={_DEBIAN_KEYRING}] {DEBIAN_SECURITY} {DEBIAN_SUITE}-security main")
        sources.write_text("\n".join(lines) + "\n")
        opts += [f"Dir::Etc::SourceList={sources}", "Dir::Etc::SourceParts=/nonexistent"]
    return [x for o in opts for x in ("-o", o)]


def _step_sysroot(root: pathlib.Path, say: Callable[[str], None], mirror: str | None) -> None:
    sysroot = _sysroot(root)
    if (sysroot / _COMPLETE).is_file() and _python(root).exists():
        say(f"      already done: {sysroot}")
        return
    apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if apt is None or dpkg is None:
        raise SetupError("building the arm64 sysroot needs apt-get and dpkg-deb (Debian/Ubuntu); "
                         "run onnx-lowrank arm64-setup on such a machine, or copy a prepared cache with --cache DIR")
    apt_dir = root / "apt"
    for d in (apt_dir / "state" / "lists" / "partial", apt_dir / "cache" / "archives" / "partial"):
        d.mkdir(parents=True, exist_ok=True)
    (apt_dir / "status").touch()
    opts = _apt_options(apt_dir, mirror)
    t0 = time.perf_counter()
    say("      apt-get update (arm64 package lists, private state)")
    _run([apt, *opts, "update", "-q"], what="apt-get update of the arm64 package lists")
    debs = root / "debs"
    shutil.rmtree(debs, ignore_errors=True)
    debs.mkdir()
    say(f"      apt-get download of {len(SYSROOT_PACKAGES)} arm64 packages")
    _run([apt, *opts, "download", "-q", *SYSROOT_PACKAGES], what="apt-get download of the arm64 packages", cwd=debs)
    files = sorted(debs.glob("*.deb"))
    if len(files) < len(SYSROOT_PACKAGES):
        raise SetupError(f"apt-get downloaded {len(files)} of {len(SYSROOT_PACKAGES)} arm64 packages into {debs}")
    tmp = root / "sysroot.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for f in files:
        _run([dpkg, "-x", str(f), str(tmp)], what=f"dpkg-deb -x {f.name}")
    if not (tmp / "usr" / "bin" / f"python{PYTHON_VERSION}").exists():
        raise SetupError(f"the arm64 packages did not contain usr/bin/python{PYTHON_VERSION}")
    (tmp / _COMPLETE).write_text("\n".join(f.name for f in files) + "\n")
    shutil.rmtree(sysroot, ignore_errors=True)
    tmp.rename(sysroot)  # atomic: an interrupted setup never leaves a half sysroot that looks done
    # the package lists and .debs are not needed once unpacked: the sysroot is the product
    shutil.rmtree(debs, ignore_errors=True)
    shutil.rmtree(apt_dir, ignore_errors=True)
    say(f"      done: {len(files)} packages in {time.perf_counter() - t0:.1f} s")


def _step_wheels(root: pathlib.Path, say: Callable[[str], None]) -> None:
    site = _site(root)
    want = f"onnxruntime=={ORT_VERSION} numpy=={NUMPY_VERSION}"
    done = site / _COMPLETE
    if done.is_file() and done.read_text().strip() == want:
        say(f"      already done: {site}")
        return
    wheels = root / "wheels"
    wheels.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    cmd = [
        sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
        "--only-binary=:all:", "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux2014_aarch64",
        "--python-version", PYTHON_VERSION, "--implementation", "cp", "-d", str(wheels),
        f"onnxruntime=={ORT_VERSION}", f"numpy=={NUMPY_VERSION}",
    ]
    # onnxruntime's other requirements (protobuf, sympy, flatbuffers, coloredlogs) serve its
    # tools, not InferenceSession: --no-deps keeps the site small
    try:
        _run(cmd, what="pip download of the aarch64 wheels")
    except SetupError as exc:
        if "No module named pip" in str(exc):
            raise SetupError(f"{sys.executable} has no pip; run: {sys.executable} -m ensurepip") from exc
        raise
    found = []
    for name, version in (("onnxruntime", ORT_VERSION), ("numpy", NUMPY_VERSION)):
        hits = sorted(wheels.glob(f"{name}-{version}-cp{PYTHON_VERSION.replace('.', '')}-*aarch64*.whl"))
        if not hits:
            raise SetupError(f"pip did not download an aarch64 wheel of {name} {version} into {wheels}")
        found.append(hits[-1])
    tmp = root / "site.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for whl in found:
        with zipfile.ZipFile(whl) as z:
            z.extractall(tmp)
    for so in tmp.rglob("*.so*"):  # zipfile drops the execute bits
        so.chmod(0o755)
    (tmp / _COMPLETE).write_text(want + "\n")
    shutil.rmtree(site, ignore_errors=True)
    tmp.rename(site)
    shutil.rmtree(wheels, ignore_errors=True)  # unpacked; pip's own cache keeps the downloads
    say(f"      done: {', '.join(w.name for w in found)} in {time.perf_counter() - t0:.1f} s")


def _emulated_env(root: pathlib.Path) -> dict[str, str]:
    """Environment of the emulated interpreter: nothing of this (x86) Python leaks in."""
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
        "QEMU_LD_PREFIX": str(_sysroot(root)),  # where qemu finds the arm64 loader and libraries
        "PYTHONPATH": str(_site(root)),
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",  # bytecode is precompiled by setup; runs never write the cache
        "OMP_NUM_THREADS": "1",
    }


def _emulated_cmd(root: pathlib.Path, qemu: str, *args: str) -> list[str]:
    return [qemu, str(_python(root)), *args]


def _step_bytecode(root: pathlib.Path, qemu: str, say: Callable[[str], None]) -> None:
    done = root / ".bytecode"
    stamp = f"onnxruntime=={ORT_VERSION} numpy=={NUMPY_VERSION}"
    if done.is_file() and done.read_text().strip() == stamp:
        say("      already done")
        return
    t0 = time.perf_counter()
    targets = [str(_sysroot(root) / "usr" / "lib" / f"python{PYTHON_VERSION}"), str(_site(root))]
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == PYTHON_VERSION:
        # .pyc files are platform independent within a minor version: compile natively (seconds)
        cmd = [sys.executable, "-m", "compileall", "-q", "-j", "0", *targets]
        env = None
    else:
        cmd = _emulated_cmd(root, qemu, "-m", "compileall", "-q", *targets)
        env = _emulated_env(root)
        env.pop("PYTHONDONTWRITEBYTECODE")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    # compileall exits 1 when some file does not compile (test files with deliberate syntax
    # errors in the stdlib); that costs nothing but those files' import speed
    if proc.returncode not in (0, 1):
        raise SetupError(f"compileall failed (exit {proc.returncode}): {' '.join(proc.stderr.split())[-300:]}")
    done.write_text(stamp + "\n")
    say(f"      done in {time.perf_counter() - t0:.1f} s")


_SMOKE = (
    "import json, platform, sys; import numpy, onnxruntime; "
    "print(json.dumps({'onnxruntime': onnxruntime.__version__, 'numpy': numpy.__version__, "
    "'machine': platform.machine(), 'python': platform.python_version(), "
    "'providers': onnxruntime.get_available_providers()}))"
)


def _smoke_test(root: pathlib.Path, qemu: str) -> dict[str, Any]:
    if not _python(root).exists():
        raise SetupError(f"{_python(root)} is missing")
    try:
        proc = subprocess.run(_emulated_cmd(root, qemu, "-c", _SMOKE), env=_emulated_env(root),
                              capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SetupError(f"the emulated Python did not start: {exc}") from exc
    if proc.returncode != 0:
        why = " ".join(proc.stderr.split())[-300:] or f"exit status {proc.returncode}"
        if proc.returncode < 0:
            why = f"killed by signal {-proc.returncode} ({why})"
        raise SetupError(f"importing onnxruntime under qemu failed: {why}")
    try:
        got = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise SetupError(f"unexpected smoke-test output: {proc.stdout[-200:]!r}") from exc
    if got.get("machine") != "aarch64":
        raise SetupError(f"the emulated Python reports machine {got.get('machine')!r}, not aarch64")
    return got


def _atomic_write(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# --------------------------------------------------------------------------------------------
# running models
# --------------------------------------------------------------------------------------------

#: The runner executed by the emulated interpreter (only numpy and onnxruntime exist there).
_RUNNER = r'''
import json, platform, sys, time
import numpy as np
import onnxruntime as ort

job = json.load(open(sys.argv[1]))
with np.load(job["inputs"], allow_pickle=False) as data:
    arrays = {name: data[f"i{j}"] for j, name in enumerate(job["input_names"])}
result = {"onnxruntime": ort.__version__, "numpy": np.__version__, "machine": platform.machine(),
          "python": platform.python_version(), "models": []}
for k, path in enumerate(job["models"]):
    entry = {"path": path}
    t0 = time.perf_counter()
    try:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, job["opt_level"])
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        entry["providers"] = sess.get_providers()
        names = [o.name for o in sess.get_outputs()]
        wanted = [i.name for i in sess.get_inputs()]
        missing = [n for n in wanted if n not in arrays]
        if missing:
            raise ValueError(f"no input data for {missing}")
        saved, skipped = {}, []
        for s in range(job["samples"]):
            values = sess.run(names, {n: arrays[n][s] for n in wanted})
            for o, v in enumerate(values):
                if isinstance(v, np.ndarray):
                    saved[f"o{o}_s{s}"] = v
                elif names[o] not in skipped:
                    skipped.append(names[o])
        out = f"{job['outdir']}/model{k}.npz"
        np.savez(out, **saved)
        entry.update(outputs=names, file=out, non_tensor_outputs=skipped)
    except Exception as exc:
        entry["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
    entry["emulated_seconds"] = time.perf_counter() - t0
    result["models"].append(entry)
with open(job["result"], "w") as f:
    json.dump(result, f)
'''

_OPT_NAMES = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
              "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def run_models_arm64(
    model_paths: Sequence[str | os.PathLike[str]],
    inputs: Mapping[str, np.ndarray],
    *,
    cache: str | os.PathLike[str] | None = None,
    samples: int | None = None,
    opt_level: str = "all",
    timeout: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """Run models on onnxruntime's ARM64 CPU build under qemu-user, one emulated process for all.

    Parameters
    ----------
    model_paths : sequence of path-like
        ``.onnx`` (external data next to it is found) or ``.ort`` files.
    inputs : mapping of str to numpy.ndarray
        Samples, first axis = sample (as :func:`onnx_lowrank.measure.harness.make_inputs` returns); each
        model is fed the inputs it declares.
    cache : path-like, optional
        The runtime's cache directory (default :func:`default_cache`).
    samples : int, optional
        Run only the first ``samples`` samples (default all).
    opt_level : {"disable", "basic", "extended", "all"}
        onnxruntime graph optimization level inside the ARM64 runtime.
    timeout : float
        Seconds before the emulated process is killed.

    Returns
    -------
    dict
        ``available`` (bool). When False, ``reason`` (one line). When True: ``onnxruntime``,
        ``numpy``, ``python``, ``machine`` (``aarch64``), ``qemu``, ``samples``,
        ``emulation_wall_s`` (the whole emulated job; not a latency) and ``models``: one dict per
        path with ``path``, and either ``outputs`` (output name -> list of per-sample arrays;
        non-tensor outputs are left out and named in ``non_tensor_outputs``) or ``error``.
    """
    ready = check(cache)
    if not ready.ready:
        return {"available": False, "reason": ready.reason}
    if opt_level not in _OPT_NAMES:
        raise ValueError(f"unknown opt_level {opt_level!r}; choose from {', '.join(_OPT_NAMES)}")
    root, qemu = ready.cache, ready.qemu
    assert qemu is not None
    names = list(inputs)
    total = int(next(iter(inputs.values())).shape[0]) if inputs else 1
    n = total if samples is None else max(1, min(int(samples), total))
    paths = [str(pathlib.Path(os.fspath(p)).resolve()) for p in model_paths]
    with tempfile.TemporaryDirectory(prefix="onnx_lowrank_arm64_") as tmp:
        work = pathlib.Path(tmp)
        (work / "runner.py").write_text(_RUNNER)
        np.savez(work / "inputs.npz", **{f"i{j}": np.ascontiguousarray(inputs[k][:n]) for j, k in enumerate(names)})
        job = {"models": paths, "inputs": str(work / "inputs.npz"), "input_names": names, "samples": n,
               "opt_level": _OPT_NAMES[opt_level], "outdir": str(work), "result": str(work / "result.json")}
        (work / "job.json").write_text(json.dumps(job))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(_emulated_cmd(root, qemu, str(work / "runner.py"), str(work / "job.json")),
                                  env=_emulated_env(root), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"available": False, "reason": f"the emulated run did not finish within {timeout:g} s"}
        except OSError as exc:
            return {"available": False, "reason": f"cannot start {qemu}: {exc.strerror}"}
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not (work / "result.json").is_file():
            why = " ".join(proc.stderr.split())[-300:] or f"exit status {proc.returncode}"
            if proc.returncode < 0:
                why = f"killed by signal {-proc.returncode}: {why}"
            return {"available": False, "reason": f"the emulated runner failed: {why}"}
        result = json.loads((work / "result.json").read_text())
        models = []
        for entry in result.pop("models"):
            out: dict[str, Any] = {"path": entry["path"], "emulated_seconds": entry.get("emulated_seconds")}
            if "error" in entry:
                out["error"] = entry["error"]
            else:
                with np.load(entry["file"], allow_pickle=False) as data:
                    outputs: dict[str, list[np.ndarray]] = {}
                    for o, name in enumerate(entry["outputs"]):
                        if name in entry["non_tensor_outputs"]:
                            continue
                        outputs[name] = [data[f"o{o}_s{s}"] for s in range(n)]
                out["outputs"] = outputs
                out["non_tensor_outputs"] = entry["non_tensor_outputs"]
            models.append(out)
    return {"available": True, **result, "qemu": ready.info.get("qemu_version", qemu), "samples": n,
            "emulation_wall_s": wall, "models": models}


# --------------------------------------------------------------------------------------------
# the bench section
# --------------------------------------------------------------------------------------------


def _tolerance(dtype: np.dtype) -> tuple[float, float] | None:
    return ARM64_TOLERANCE.get(np.dtype(dtype).name)


def compare_arm64_x86(arm: Sequence[np.ndarray], x86: Sequence[Any]) -> dict[str, Any]:
    """How far one output on ARM64 is from the same model's output on x86.

    Returns
    -------
    dict
        ``max_abs``, ``rel_l2``, ``ref_max_abs``, ``tolerance`` ({"rtol", "atol"}, or "exact" for
        integer outputs) and ``match`` (``max_abs <= atol + rtol * ref_max_abs``, see
        :data:`ARM64_TOLERANCE`).
    """
    if len(arm) != len(x86) or any(np.shape(a) != np.shape(b) for a, b in zip(arm, x86)):
        return {"match": False, "error": "shapes differ between ARM64 and x86"}
    a = np.concatenate([np.asarray(v, np.float64).ravel() for v in arm]) if arm else np.zeros(0)
    b = np.concatenate([np.asarray(v, np.float64).ravel() for v in x86]) if x86 else np.zeros(0)
    diff = np.abs(a - b)
    both_nan = np.isnan(a) & np.isnan(b)
    diff[both_nan] = 0.0
    max_abs = float(np.max(diff)) if diff.size else 0.0
    ref_max = float(np.max(np.abs(b[np.isfinite(b)]))) if np.isfinite(b).any() else 0.0
    norm = float(np.linalg.norm(b[np.isfinite(b)]))
    res: dict[str, Any] = {
        "max_abs": max_abs,
        "rel_l2": float(np.linalg.norm(diff[np.isfinite(diff)]) / norm) if norm > 0 else None,
        "ref_max_abs": ref_max,
    }
    tol = _tolerance(np.asarray(x86[0]).dtype) if len(x86) else None
    if tol is None:
        res["tolerance"] = "exact"
        res["match"] = bool(max_abs == 0.0)
    else:
        rtol, atol = tol
        res["tolerance"] = {"rtol": rtol, "atol": atol}
        res["match"] = bool(np.isfinite(max_abs) and max_abs <= atol + rtol * ref_max)
    return res


def arm64_section(
    original: str | os.PathLike[str],
    compressed: Sequence[str | os.PathLike[str]],
    inputs: Mapping[str, np.ndarray],
    x86_outputs: Sequence[Mapping[str, Sequence[Any]]],
    *,
    cache: str | os.PathLike[str] | None = None,
    samples: int = DEFAULT_SAMPLES,
    opt_level: str = "all",
    ort_models: Sequence[str | os.PathLike[str] | None] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> list[dict[str, Any]]:
    """The ``"arm64"`` report of ``bench --arm64``: original and compressed models on ARM64.

    Parameters
    ----------
    original, compressed : path-like
        The models, in the order of ``x86_outputs``.
    inputs : mapping of str to numpy.ndarray
        The samples the x86 outputs were computed on.
    x86_outputs : sequence of mapping
        Per model (original first): output name -> per-sample values on x86.
    cache, samples, opt_level, timeout
        See :func:`run_models_arm64`.
    ort_models : sequence, optional
        ``.ort`` conversions of the same models (None where a conversion failed): also run on
        ARM64 and compared with the x86 run of the ``.onnx`` model.

    Returns
    -------
    list of dict
        One section per compressed model (one for the original alone when ``compressed`` is
        empty), each ``{"available", "status", "onnxruntime", "outputs", ...}``. ``outputs`` maps
        an output name to ``compressed_vs_original`` (accuracy metrics on ARM64, see
        :func:`onnx_lowrank.measure.harness.output_metrics`) and ``arm64_vs_x86`` (``original`` /
        ``compressed``: :func:`compare_arm64_x86`). Unavailable: ``available`` False, ``status``
        ``"unavailable: <reason>"``, ``reason``, ``onnxruntime`` None, ``outputs`` empty.
    """
    from onnx_lowrank.measure import harness as H  # the harness imports onnxruntime; keep this module light

    paths = [os.fspath(original), *map(os.fspath, compressed)]
    ort_list = list(ort_models or [])
    run_paths = paths + [os.fspath(p) for p in ort_list if p is not None]
    res = run_models_arm64(run_paths, inputs, cache=cache, samples=samples, opt_level=opt_level, timeout=timeout)
    n_sections = max(1, len(compressed))
    if not res["available"]:
        gone = {"available": False, "status": f"unavailable: {res['reason']}", "reason": res["reason"],
                "onnxruntime": None, "outputs": {}}
        return [dict(gone) for _ in range(n_sections)]
    n = res["samples"]
    runs = res["models"]
    onnx_runs, ort_runs = runs[: len(paths)], runs[len(paths):]
    x86 = [{k: list(v)[:n] for k, v in out.items()} for out in x86_outputs]

    def vs_x86(run: Mapping[str, Any], ref: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
        if "error" in run:
            return {}
        return {name: compare_arm64_x86(run["outputs"][name], ref[name])
                for name in ref if name in run["outputs"]}

    base = {
        "available": True,
        "status": "ok",
        "onnxruntime": res["onnxruntime"],
        "runtime": {"machine": res["machine"], "python": res["python"], "numpy": res["numpy"],
                    "qemu": res["qemu"], "opt_level": opt_level},
        "samples": n,
        "note": "outputs computed by onnxruntime's ARM64 CPU kernels under qemu-user emulation; "
                "emulated times are not latency and are not reported as such",
        "emulation_wall_s": res["emulation_wall_s"],
    }
    orig_vs = vs_x86(onnx_runs[0], x86[0])
    ort_iter = iter(ort_runs)
    ort_results: list[dict[str, Any] | None] = []
    for j, p in enumerate(ort_list):
        if p is None:
            ort_results.append(None)
            continue
        run = next(ort_iter)
        ort_results.append({"path": os.path.basename(os.fspath(p)), "error": run["error"]} if "error" in run
                           else {"path": os.path.basename(os.fspath(p)), "arm64_vs_x86": vs_x86(run, x86[j])})

    sections = []
    for j in range(n_sections):
        sec = dict(base)
        model_runs = [onnx_runs[0]] + ([onnx_runs[j + 1]] if compressed else [])
        sec["models"] = [
            {"path": r["path"], "role": "original" if i == 0 else "compressed", "ran": "error" not in r,
             **({"error": r["error"]} if "error" in r else {})}
            for i, r in enumerate(model_runs)
        ]
        outputs: dict[str, dict[str, Any]] = {}
        for name in x86[0]:
            entry: dict[str, Any] = {"arm64_vs_x86": {"original": orig_vs.get(name)}}
            if compressed:
                comp = onnx_runs[j + 1]
                entry["arm64_vs_x86"]["compressed"] = vs_x86(comp, x86[j + 1]).get(name)
                if "error" not in onnx_runs[0] and "error" not in comp and name in comp["outputs"] \
                        and name in onnx_runs[0]["outputs"]:
                    entry["compressed_vs_original"] = H.output_metrics(
                        onnx_runs[0]["outputs"][name], comp["outputs"][name], name=name
                    )
            outputs[name] = entry
        sec["outputs"] = outputs
        if ort_list:
            sec["ort_format"] = {"original": ort_results[0]}
            if compressed:
                sec["ort_format"]["compressed"] = ort_results[j + 1] if j + 1 < len(ort_results) else None
        sections.append(sec)
    return sections


def section_failures(section: Mapping[str, Any]) -> list[str]:
    """Failed checks of one ``"arm64"`` section (a model that does not run on ARM64, or outputs
    that differ from x86 beyond :data:`ARM64_TOLERANCE`). An unavailable runtime is not a failure."""
    if not section.get("available"):
        return []
    out = []
    for m in section.get("models", []):
        if not m["ran"]:
            out.append(f"{m['path']}: does not run on ARM64 onnxruntime {section['onnxruntime']}: {m.get('error')}")
    for name, entry in section.get("outputs", {}).items():
        for role, cmp in entry.get("arm64_vs_x86", {}).items():
            if cmp is not None and not cmp.get("match", True):
                out.append(f"{role} model, output {name!r}: ARM64 differs from x86 (max abs {cmp.get('max_abs', float('nan')):.3g}"
                           f" > tolerance)")
    for role, r in (section.get("ort_format") or {}).items():
        if r is None:
            continue
        if "error" in r:
            out.append(f"{role} model's .ort file does not run on ARM64 onnxruntime {section['onnxruntime']}: {r['error']}")
        else:
            for name, cmp in r["arm64_vs_x86"].items():
                if not cmp.get("match", True):
                    out.append(f"{role} model's .ort file, output {name!r}: ARM64 differs from x86 "
                               f"(max abs {cmp.get('max_abs', float('nan')):.3g})")
    return out

