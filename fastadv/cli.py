"""The ``fastadv`` command line: one subcommand per module in ``fastadv.commands``."""
from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys

# subcommand -> module in fastadv.commands exposing add_arguments(parser) and run(args) -> int
SUBCOMMANDS = {
    "doctor": "Report torch/triton/CUDA versions, the GPU, each backend's state and the built extension.",
    "build": "Compile the C++/CUDA extension ahead of time for target GPU architectures.",
    "bench": "Run the benchmarks (ops, attacks, ...) and print a comparison table.",
    "eval": "Evaluate a model's robustness (AutoAttack and friends) and write a report.",
    "train": "Adversarially train a model.",
    "demo": "Robust training of a small CNN on embedded MNIST, then evaluation: the README's demo.",
}


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "default" in text.lower():
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{text} (default: {'on' if action.default else 'off'})"
        if action.default is None or action.default == [] or action.default == "":
            return f"{text} (default: none)"
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser():
    """(the top parser, {subcommand: module})."""
    parser = Parser(prog="fastadv", description="Fast adversarial attacks and training.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, help_text in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(f"fastadv.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"fastadv.commands.{name}":
                raise
            continue  # not part of this build yet
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        modules[name] = mod
    return parser, modules


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def _walk(parser):
    """The parser and every subcommand parser below it."""
    yield parser
    sp = _subparsers(parser)
    if sp is not None:
        for child in dict.fromkeys(sp.choices.values()):
            yield from _walk(child)


def _used_parser(parser, args):
    """The innermost subcommand parser the command line chose."""
    p = parser
    while True:
        sp = _subparsers(p)
        if sp is None:
            return p
        chosen = getattr(args, sp.dest, None)
        if chosen is None or chosen not in sp.choices:
            return p
        p = sp.choices[chosen]


def _options(parser):
    return [o for a in parser._actions for o in a.option_strings if o.startswith("--")]


def _unrecognized(top, used, extra) -> int:
    """Print the chosen subcommand's usage and, per unknown flag, where it belongs or its
    closest match; exit status 2, as argparse's own errors."""
    flags = _options(used)
    elsewhere = {}
    for p in _walk(top):
        if p is used:
            continue
        for o in _options(p):
            elsewhere.setdefault(o, []).append(p.prog)
    msgs = []
    after_flag = False
    for item in extra:
        if not item.startswith("-") or item == "-":
            if not after_flag:   # not the value of the unknown flag just before it
                msgs.append(f"unexpected argument {item!r}")
            after_flag = False
            continue
        after_flag = "=" not in item
        flag = item.split("=", 1)[0]
        msg = f"unrecognized argument {flag}"
        if flag in elsewhere:
            progs = sorted(elsewhere[flag], key=lambda p: len(p.split()))   # top-level commands first
            msg += f" (it is a flag of {', '.join(f'`{p}`' for p in progs)}, not of `{used.prog}`)"
        # a known flag the typed one starts with (--eps in --epsilon) is the likeliest meaning
        close = sorted((f for f in flags if flag.startswith(f) or f.startswith(flag)),
                       key=lambda f: abs(len(f) - len(flag)))[:1]
        close += [f for f in difflib.get_close_matches(flag, flags, n=2, cutoff=0.6) if f not in close]
        close = close[:2]
        if close:
            msg += f"; did you mean {' or '.join(close)}?"
        msgs.append(msg)
        if len(msgs) >= 4:
            break
    used.print_usage(sys.stderr)
    for m in msgs:
        print(f"{used.prog}: error: {m}", file=sys.stderr)
    return 2


def _interrupted(args) -> str:
    cmd = getattr(args, "command", None) or ""
    hint = ""
    if cmd == "eval":
        hint = "; run the same command again to resume from its state file"
    elif cmd == "train":
        hint = "; run the same command again to resume from the last checkpoint"
    return f"fastadv {cmd}: interrupted{hint}"


# seconds between Ctrl-C and a forced exit, should the KeyboardInterrupt never reach main()
INTERRUPT_GRACE_S = 10.0


def _leave_interrupted(args) -> None:
    try:
        sys.stdout.flush()
    except Exception:
        pass
    print(f"\n{_interrupted(args)}", file=sys.stderr, flush=True)
    os._exit(130)


def _install_interrupt_handler(args) -> None:
    """Ctrl-C raises KeyboardInterrupt as usual (checkpoints and state files are written
    atomically, so nothing is left torn); a second Ctrl-C, or the first one's interrupt not
    reaching ``main`` within ``INTERRUPT_GRACE_S`` (CPython drops an exception raised while
    a ``__del__`` or a weakref callback runs, which a signal can land in), leaves at once
    with the same one line."""
    import signal
    import threading

    hit = []

    def handler(signum, frame):
        if hit:
            _leave_interrupted(args)
        hit.append(True)
        timer = threading.Timer(INTERRUPT_GRACE_S, _leave_interrupted, (args,))
        timer.daemon = True
        timer.start()
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)


def main(argv=None) -> int:
    parser, modules = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        return _unrecognized(parser, _used_parser(parser, args), extra)
    if args.command is None:
        parser.print_help()
        return 2
    if argv is None:  # the process's own entry point
        _install_interrupt_handler(args)
    try:
        return int(modules[args.command].run(args) or 0)
    except KeyboardInterrupt:
        # one line, not a traceback (nor the worker threads' at interpreter exit)
        if argv is None:   # the process's own entry point: leave now, without joining worker threads
            _leave_interrupted(args)
        try:
            sys.stdout.flush()
        except Exception:
            pass
        print(f"\n{_interrupted(args)}", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
