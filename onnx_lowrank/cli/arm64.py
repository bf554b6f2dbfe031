"""The ``arm64-setup`` subcommand: prepare (or ``--check``) the cached ARM64 onnxruntime.

``onnx-lowrank arm64-setup [--cache DIR] [--check]`` prepares, once, the runtime that
``onnx-lowrank bench --arm64`` runs models in: qemu-user, an arm64 sysroot with Python 3.11 and
the aarch64 wheels of onnxruntime and numpy (see :mod:`onnx_lowrank.measure.arm64_setup`). Each
step prints what it does; finished steps are skipped, so a second run takes seconds.

Exit codes: 0 ready; 1 a step failed or (with ``--check``) not ready; the failing step prints one
line on stderr saying what to run.
"""

from __future__ import annotations

import argparse
import sys
import time

from onnx_lowrank.cli.common import print_error
from onnx_lowrank.measure import arm64_setup

__all__ = ["add_arm64_setup_arguments", "run_arm64_setup"]

DESCRIPTION = (
    "Prepare, once, the ARM64 onnxruntime that 'bench --arm64' runs models in: qemu-user (the system's, "
    "else Debian's static qemu-aarch64 fetched into the cache with apt-get download), an arm64 sysroot with Debian's Python "
    f"{arm64_setup.PYTHON_VERSION} (downloaded with a private apt state, no root), and the aarch64 wheels of "
    f"onnxruntime {arm64_setup.ORT_VERSION} and numpy {arm64_setup.NUMPY_VERSION}. Idempotent: finished steps are skipped."
)


def add_arm64_setup_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``arm64-setup`` options to a parser (the subparser, or a standalone parser)."""
    parser.add_argument("--cache", metavar="DIR",
                        help="where the runtime lives (default $ONNX_LOWRANK_ARM64_CACHE, else "
                        "~/.cache/onnx-lowrank/arm64); bench --arm64 --arm64-cache DIR uses it")
    parser.add_argument("--check", action="store_true",
                        help="report whether the runtime is ready (starts it once under qemu) and change nothing")
    parser.add_argument("--no-install", action="store_true",
                        help="never fetch qemu-user-static when it is missing; say what to run instead")
    parser.add_argument("--mirror", metavar="URL",
                        help=f"Debian mirror for the arm64 packages (default: the system's sources on Debian "
                        f"{arm64_setup.DEBIAN_SUITE}, else {arm64_setup.DEBIAN_MIRROR})")


def run_arm64_setup(args: argparse.Namespace) -> int:
    """Run ``arm64-setup``; returns the exit code (0 ready, 1 not ready / failed)."""
    if args.check:
        state = arm64_setup.check(args.cache, probe=True)
        if state.ready:
            info = state.info
            print(f"ready: onnxruntime {info.get('onnxruntime')} (numpy {info.get('numpy')}, Python "
                  f"{info.get('python')}, {info.get('machine')}) in {state.cache}, via {state.qemu} "
                  f"({info.get('qemu_version', 'qemu')})")
            return 0
        print(f"not ready: {state.reason}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()

    def say(line: str) -> None:
        print(line, flush=True)

    try:
        state = arm64_setup.setup(args.cache, say=say, install_qemu=not args.no_install, mirror=args.mirror)
    except arm64_setup.SetupError as exc:
        print_error("arm64-setup", exc)
        return 1
    except KeyboardInterrupt:
        print_error("arm64-setup", "interrupted (finished steps are kept; rerun to continue)")
        return 130
    if not state.ready:  # pragma: no cover - setup ends with a smoke test
        print_error("arm64-setup", state.reason)
        return 1
    print(f"ready in {time.perf_counter() - t0:.1f} s: onnx-lowrank bench ORIGINAL COMPRESSED --arm64"
          + ("" if args.cache is None else f" --arm64-cache {state.cache}"))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m onnx_lowrank.cli.arm64``: the subcommand without the main CLI."""
    parser = argparse.ArgumentParser(prog="onnx-lowrank arm64-setup", description=DESCRIPTION)
    add_arm64_setup_arguments(parser)
    return run_arm64_setup(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
