"""Preparing onnxruntime's ARM64 CPU build to run on an x86 Linux machine under qemu-user.

Phones run onnxruntime's ARM64 CPU kernels (MLAS's NEON code paths), not the x86 ones the other
measurements time. This module prepares, once, a cached ARM64 runtime that
:mod:`onnx_lowrank.measure.arm64` runs models in:

- :func:`setup` builds the runtime in a cache directory (:func:`default_cache`), step by step (each
  step says what it does and is skipped when already done): qemu-user, an arm64 sysroot with
  Debian's Python 3.11, the aarch64 wheels of onnxruntime and numpy, precompiled bytecode, and a
  smoke test;
- :func:`check` says whether the runtime is ready (:class:`Readiness`), changing nothing;
- :func:`emulated_cmd` and :func:`emulated_env` start the emulated interpreter.

The sysroot is downloaded with a *private* apt state inside the cache (its own package lists,
Debian bookworm's arm64 archive): the system's apt configuration (``dpkg --add-architecture``) is
not touched, and that step needs no root. Only installing qemu-user-static, when it is missing,
needs root. A step that cannot proceed raises :class:`SetupError` with one line saying what to run.
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

logger = logging.getLogger(__name__)

__all__ = [
    "DEBIAN_MIRROR",
    "DEBIAN_SUITE",
    "NUMPY_VERSION",
    "ORT_VERSION",
    "PYTHON_VERSION",
    "Readiness",
    "SYSROOT_PACKAGES",
    "SetupError",
    "check",
    "default_cache",
    "emulated_cmd",
    "emulated_env",
    "find_qemu",
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


def emulated_env(root: pathlib.Path) -> dict[str, str]:
    """Environment of the emulated interpreter: nothing of this (x86) Python leaks in.

    Parameters
    ----------
    root : pathlib.Path
        The cache directory of the runtime.

    Returns
    -------
    dict of str to str
    """
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


def emulated_cmd(root: pathlib.Path, qemu: str, *args: str) -> list[str]:
    """The command line that runs the sysroot's Python under qemu (run it with :func:`emulated_env`).

    Parameters
    ----------
    root : pathlib.Path
        The cache directory of the runtime.
    qemu : str
        The qemu-user binary (:func:`find_qemu`).
    *args : str
        Arguments of the emulated Python (a script and its arguments, ``-c CODE``, ``-m MODULE``).

    Returns
    -------
    list of str
    """
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
        cmd = emulated_cmd(root, qemu, "-m", "compileall", "-q", *targets)
        env = emulated_env(root)
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
        proc = subprocess.run(emulated_cmd(root, qemu, "-c", _SMOKE), env=emulated_env(root),
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
