"""Under ``torchrun … -m fastadv eval|train …`` torchrun's own parser sees every flag first and
rejects an abbreviation of one of its flags (``--n`` could be ``--nnodes``): each of the
commands' flags must reach fastadv untouched (eval's ``--n`` as ``--points``)."""
import argparse
import importlib

import pytest

run = pytest.importorskip("torch.distributed.run")

# flags that abbreviate a torchrun flag, and the spelling to use under torchrun instead
ALIASES = {("eval", "--n"): "--points"}


def _torchrun_parse(argv):
    p = run.get_args_parser()

    def error(msg):
        raise ValueError(msg)
    p.error = error
    return p.parse_args(argv)


@pytest.mark.parametrize("command", ["eval", "train", "demo"])
def test_every_flag_survives_torchruns_parser(command):
    mod = importlib.import_module(f"fastadv.commands.{command}")
    parser = argparse.ArgumentParser()
    mod.add_arguments(parser)
    flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    assert flags
    for flag in flags:
        use = ALIASES.get((command, flag), flag)
        if use != flag:
            assert use in flags, f"{command}: {use} should be an alias of {flag}"
            with pytest.raises(ValueError, match="ambiguous"):
                _torchrun_parse(["--nproc-per-node", "2", "-m", "fastadv", command, flag, "1"])
        args = _torchrun_parse(["--nproc-per-node", "2", "-m", "fastadv", command, use, "1"])
        assert args.training_script == "fastadv" and args.module
        assert args.training_script_args == [command, use, "1"]


def test_points_is_n():
    mod = importlib.import_module("fastadv.commands.eval")
    parser = argparse.ArgumentParser()
    mod.add_arguments(parser)
    assert parser.parse_args(["--points", "40"]).n == 40
    assert parser.parse_args(["--n", "40"]).n == 40
