"""``fastadv bench ops|attacks|train``: print a benchmark's comparison table (and save it as JSON)."""
from __future__ import annotations

import sys

from ._args import add_progress, at_least, check_device, check_threads, progress_on


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="suite", metavar="SUITE")
    ops = sub.add_parser("ops", help="each fused op on each ready backend vs the eager sequence",
                         description="Each fused op on each ready backend vs the eager sequence.")
    ops.add_argument("--threads", type=int, default=None,
                     help="CPU threads (default: 2 on CPU, as the targets are stated)")
    ops.add_argument("--device", choices=["cpu", "cuda"], default=None,
                     help="default: cuda when available, else cpu")
    ops.add_argument("--json", metavar="PATH", help="also write the rows as JSON (default: none)")

    atk = sub.add_parser("attacks", help="fastadv attacks vs torchattacks on the same model and batch",
                         description="fastadv attacks vs torchattacks on the same model, points and budget. "
                                     "The first run trains and caches its small models (minutes on a CPU).")
    atk.add_argument("--threads", type=int, default=2, help="CPU threads")
    atk.add_argument("--device", choices=["cpu", "cuda"], default=None,
                     help="default: cuda when available, else cpu")
    atk.add_argument("--quick", action="store_true", help="skip the slowest rows")
    atk.add_argument("--repeats", type=int, default=3, help="timed repeats per row (median)")
    atk.add_argument("--only", nargs="+", metavar="TEXT",
                     help="only the rows whose name contains one of these (default: all)")
    atk.add_argument("--json", metavar="PATH", help="also write the rows as JSON (default: none)")
    add_progress(atk)

    trn = sub.add_parser("train", help="time-to-robustness of the training methods on MNIST-5k "
                                       "(wall time ÷ standard training, clean and PGD accuracy)",
                         description="Time-to-robustness of the training methods on MNIST-5k.")
    from fastadv import bench_train
    bench_train.add_arguments(trn)


def _write_json(path, rows) -> None:
    if path:
        from fastadv._files import atomic_write_json
        atomic_write_json(rows, path, indent=1, default=str)


def _fail(msg: str) -> int:
    print(f"fastadv bench: {msg}", file=sys.stderr)
    return 2


def _check_common(args) -> None:
    """The flags, checked before minutes of benchmarking (a path that cannot be written
    would otherwise fail only at the end)."""
    check_threads("--threads", args.threads)
    check_device("--device", args.device)
    if getattr(args, "json", None):
        from fastadv._files import check_output_file
        check_output_file("--json", args.json)


def run(args) -> int:
    suite = getattr(args, "suite", None)
    if suite in ("ops", "attacks"):
        try:
            _check_common(args)
            if suite == "attacks":
                at_least("--repeats", args.repeats, 1)
        except ValueError as exc:
            return _fail(f"{suite}: {exc}")
    if suite == "ops":
        try:
            from fastadv import bench_ops
        except ImportError as exc:
            print(f"fastadv bench ops: not available in this build ({exc})", file=sys.stderr)
            return 1
        import torch
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        threads = args.threads if args.threads is not None else (2 if device == "cpu" else None)
        rows = bench_ops.ops_table(threads=threads, device=device)
        print(bench_ops.format_table(rows))
        _write_json(args.json, rows)
        return 0
    if suite == "attacks":
        from fastadv import bench_attacks
        if bench_attacks._torchattacks() is None:
            print("fastadv bench attacks: torchattacks is not installed; timing fastadv alone "
                  "(pip install torchattacks for the comparison)", file=sys.stderr)
        rows = bench_attacks.attacks_table(device=args.device, threads=args.threads,
                                           quick=args.quick, repeats=args.repeats, names=args.only,
                                           progress=progress_on(args.progress), log=_log)
        print(bench_attacks.format_table(rows))
        _write_json(args.json, rows)
        return 0
    if suite == "train":
        from fastadv import bench_train
        return bench_train.run(args)
    print("fastadv bench: choose a suite: ops, attacks or train (fastadv bench --help)", file=sys.stderr)
    return 2


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
