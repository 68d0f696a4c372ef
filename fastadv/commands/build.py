"""``fastadv build``: compile the C++/CUDA extension ahead of time for target GPU archs."""
from __future__ import annotations

import sys


def add_arguments(parser) -> None:
    parser.add_argument("--arch", default=None,
                        help='CUDA compute capabilities, e.g. "9.0", "8.0;9.0" or "9.0+PTX" '
                             "(default: TORCH_CUDA_ARCH_LIST, else the visible GPUs)")
    parser.add_argument("--cpu", action="store_true", help="build the CPU (cpp) backend only")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the compiler commands and their output")


def run(args) -> int:
    from .. import _build

    try:
        so = _build.build(args.arch, verbose=args.verbose, cpu_only=args.cpu)
    except _build.BuildError as exc:
        print(f"fastadv build: failed: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # e.g. the subprocess build of a process that already holds one
        print(f"fastadv build: failed: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    info = _build.build_info()
    cuda = ", ".join(info.get("cuda_archs") or []) or "none"
    print(f"fastadv build: built {so}")
    print(f"  CUDA code for: {cuda}; CPU variants: {info.get('cpu_isas', '?')}; "
          f"torch {info.get('torch_version', '?')}")
    print("  the cpp/cuda backends load it first from now on (see `fastadv doctor`)")
    return 0
