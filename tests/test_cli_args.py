"""argv(parser, **values): options spelled and values written as the parser declares them."""
import argparse
from dataclasses import dataclass, field

import pytest
import transformers

from stllava.cli_args import ArgvError, argv


def _tool():
    p = argparse.ArgumentParser(prog="tool")
    p.add_argument("benchmark", choices=["a", "b"])
    p.add_argument("--model-path", "--model_path", dest="model_path", required=True)
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--rate", type=float)
    p.add_argument("--dedup", action="store_true")
    p.add_argument("--skip-bad", dest="skip_bad", action="store_true")
    p.add_argument("--skip-bad-images", dest="skip_bad", action="store_true")  # an old alias
    p.add_argument("--ids", nargs="+", type=int)
    p.add_argument("--mode", choices=["x", "y"], default="x")
    return p


def test_positionals_first_then_options_as_given_with_the_first_option_string():
    out = argv(_tool(), model_path="m", n=4, rate=0.1, benchmark="a", dedup=True, skip_bad=True, ids=[1, 2])
    assert out == ["a", "--model-path", "m", "--n", "4", "--rate", "0.1", "--dedup", "--skip-bad", "--ids", "1", "2"]
    ns = _tool().parse_args(out)
    assert (ns.benchmark, ns.model_path, ns.n, ns.rate, ns.dedup, ns.skip_bad, ns.ids) == \
        ("a", "m", 4, 0.1, True, True, [1, 2])


def test_none_and_a_false_store_true_are_left_out():
    assert argv(_tool(), benchmark="b", model_path="m", rate=None, dedup=False) == ["b", "--model-path", "m"]


@pytest.mark.parametrize("values, message", [
    ({"model_pth": "m"}, r"no flag for model_pth \(did you mean model_path\?\)"),
    ({"dedup": "yes"}, "takes no value"),
    ({"n": [1, 2]}, "takes one value"),
    ({"mode": "z"}, "not a choice"),
    ({"benchmark": None}, "positional argument benchmark is required"),
])
def test_refusals_name_the_value(values, message):
    with pytest.raises(ArgvError, match=message):
        argv(_tool(), **{"benchmark": "a", "model_path": "m", **values})


@dataclass
class _Args:
    enable: bool = field(default=False, metadata={"help": "h"})
    lazy: bool = field(default=True, metadata={"help": "h"})
    tags: list[str] = field(default_factory=list, metadata={"help": "h"})
    lr: float = field(default=1.0, metadata={"help": "h"})


def test_hf_argument_parser_booleans_are_written_true_or_false():
    parser = transformers.HfArgumentParser(_Args)
    out = argv(parser, enable=True, lazy=False, tags=["a", "b"], lr=0.001)
    assert out == ["--enable", "True", "--lazy", "False", "--tags", "a", "b", "--lr", "0.001"]
    (parsed,) = parser.parse_args_into_dataclasses(args=out)
    assert parsed == _Args(enable=True, lazy=False, tags=["a", "b"], lr=0.001)
