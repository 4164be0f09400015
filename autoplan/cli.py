"""The ``autoplan`` command line: plan a model for a cluster, show a saved plan, calibrate a cluster.

    autoplan plan autoplan.models:gpt3_175b --cluster a100-80gb --nodes 128 --global-batch 1536 --explain
    autoplan show plan.json --explain --picture plan.png
    autoplan calibrate ...            (under torchrun; see autoplan.calibrate)

Errors print one line on stderr and exit with status 2.

Example:
    >>> from autoplan.cli import parse_mesh
    >>> parse_mesh("pp=8,tp=8")
    {'pp': 8, 'tp': 8}
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Sequence

from .vocabulary import OPTIMIZERS, PRECISIONS

__all__ = ["main", "parse_mesh", "load_factory"]

EXIT_ERROR = 2


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def parse_mesh(text: str) -> dict[str, int]:
    """``"pp=8,tp=8"`` → ``{"pp": 8, "tp": 8}``; ValueError naming the bad part otherwise."""
    mesh: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        axis, sep, value = part.partition("=")
        if not sep or axis.strip() not in ("pp", "dp", "tp") or not value.strip().isdigit():
            raise ValueError(f"--mesh part {part!r} is not AXIS=N with AXIS one of pp, dp, tp (e.g. pp=8,tp=8)")
        mesh[axis.strip()] = int(value)
    return mesh


def load_factory(spec: str) -> tuple[Any, Any]:
    """Import ``MODULE:FACTORY``, call it, and return ``(model, example_inputs)``.

    Example:
        >>> model, inputs = load_factory("autoplan.models:gpt_debug")
        >>> type(model).__name__
        'GPT'
    """
    import torch

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"model {spec!r} must be MODULE:FACTORY, e.g. autoplan.models:gpt_1_3b")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CliError(f"cannot import module {module_name!r} ({exc}); is it on PYTHONPATH?") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CliError(f"{module_name} has no callable {attr!r}")
    result = factory()
    if isinstance(result, torch.nn.Module):
        raise CliError(f"{spec} returned a model without example inputs; make it return (model, example_inputs)")
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise CliError(f"{spec} must return (model, example_inputs), got {type(result).__name__}")
    return result


_ON_OFF = {"auto": "auto", "on": True, "off": False}  # --sequence-parallel / --expert-parallel → plan()'s values
_PICTURE_HELP = ("also draw the plan (timeline per pipeline rank, memory per device) to FILE.png or FILE.svg; "
                 "needs matplotlib: pip install 'autoplan[viz]'")


def _check_picture(args: argparse.Namespace) -> None:
    """Refuse a picture that cannot be drawn before any planning (a long search is not lost to a file name)."""
    if args.picture:
        from pathlib import Path

        from .viz import FORMATS, _matplotlib

        if Path(args.picture).suffix.lower() not in FORMATS:
            raise CliError(f"--picture {args.picture!r}: the file name must end in one of {FORMATS}")
        _matplotlib()


def _output(plan, args: argparse.Namespace) -> None:
    """What both commands print after the plan: the explanation, then the picture (checked before drawing)."""
    print(plan)
    if args.explain:
        print()
        print(plan.explain())
    if args.picture:
        path = plan.draw(args.picture)
        print(f"\npicture written to {path}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoplan", description="Plan data/tensor/pipeline parallelism.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="trace a model and print the fastest layout that fits the cluster")
    p.add_argument("model", help="MODULE:FACTORY, a zero-argument callable returning (model, example_inputs)")
    p.add_argument("--cluster", default="a100-80gb", help="preset: a100-40gb, a100-80gb, h100-80gb, cpu, ...")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--devices-per-node", type=int, default=None)
    p.add_argument("--global-batch", type=int, default=None, help="default: the batch of the example inputs")
    p.add_argument("--precision", default="bf16", choices=PRECISIONS)
    p.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    p.add_argument("--mesh", type=parse_mesh, default=None, help="pin degrees, e.g. pp=8,tp=8")
    p.add_argument("--microbatch-size", type=int, default=None)
    p.add_argument("--recompute", default="auto", choices=("auto", "none", "full", "selective"))
    p.add_argument("--schedule", default="auto", choices=("auto", "gpipe", "1f1b", "interleaved"))
    p.add_argument("--data-parallel", default="auto", choices=("auto", "ddp", "fsdp"))
    p.add_argument("--time-limit", type=float, default=None, help="search time limit in seconds")
    p.add_argument("--tp-across-nodes", action="store_true", help="allow tensor-parallel groups across nodes")
    p.add_argument("--sequence-parallel", default="auto", choices=("auto", "on", "off"),
                   help="Megatron sequence parallelism with tensor parallelism: searched (auto), wherever tp > 1 "
                        "(on), never (off)")
    p.add_argument("--expert-parallel", default="off", choices=("auto", "on", "off"),
                   help="shard a mixture-of-experts model's routed experts over the data-parallel ranks: if faster "
                        "(auto), always (on), never (off)")
    p.add_argument("--fsdp-reshard", default="auto", choices=("auto", "step", "microbatch"),
                   help="FSDP between microbatches: searched (auto), keep the gathered weights through the step "
                        "(step), reshard after every microbatch, ZeRO-3 with gradient accumulation (microbatch)")
    p.add_argument("--json", default=None, help="also write the plan to this JSON file")
    p.add_argument("--explain", action="store_true", help="also print the cost split and the alternatives")
    p.add_argument("--picture", default=None, metavar="FILE", help=_PICTURE_HELP)

    s = sub.add_parser("show", help="print a saved plan")
    s.add_argument("path")
    s.add_argument("--explain", action="store_true", help="also print the cost split, timeline and alternatives")
    s.add_argument("--picture", default=None, metavar="FILE", help=_PICTURE_HELP)

    sub.add_parser("calibrate", help="measure this cluster under torchrun (see autoplan.calibrate)",
                   add_help=False)
    return parser


def _plan(args: argparse.Namespace) -> int:
    import autoplan

    _check_picture(args)
    cluster = autoplan.Cluster.preset(args.cluster, nodes=args.nodes, devices_per_node=args.devices_per_node)
    model, inputs = load_factory(args.model)
    plan = autoplan.plan(
        model, inputs, cluster=cluster, global_batch_size=args.global_batch, precision=args.precision,
        optimizer=args.optimizer, mesh=args.mesh, microbatch_size=args.microbatch_size, recompute=args.recompute,
        data_parallel=args.data_parallel, schedule=args.schedule, time_limit_s=args.time_limit,
        tp_across_nodes=args.tp_across_nodes,
        sequence_parallel=_ON_OFF[args.sequence_parallel], expert_parallel=_ON_OFF[args.expert_parallel],
        fsdp_reshard=args.fsdp_reshard,
    )
    _output(plan, args)
    if args.json:
        plan.save(args.json)
        print(f"\nplan written to {args.json}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from .plan import Plan

    _check_picture(args)
    try:
        plan = Plan.load(args.path)
    except FileNotFoundError as exc:
        raise CliError(f"no plan file at {args.path}") from exc
    _output(plan, args)
    return 0


def _calibrate(argv: list[str]) -> int:
    try:
        calibrate = importlib.import_module("autoplan.calibrate")
    except ImportError as exc:
        raise CliError(f"calibration is not available in this installation ({exc})") from exc
    if not hasattr(calibrate, "main"):
        raise CliError("autoplan.calibrate has no main(argv); calibration is not available in this installation")
    return int(calibrate.main(argv) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, or 2 after a one-line error on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["calibrate"]:
            return _calibrate(argv[1:])
        args = _parser().parse_args(argv)
        return _plan(args) if args.command == "plan" else _show(args)
    except SystemExit as exc:  # argparse: usage errors already printed
        return EXIT_ERROR if exc.code not in (0, None) else 0
    except KeyboardInterrupt:
        print("autoplan: interrupted", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # one line, never a traceback: the message names the cause and the way out
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        kind = "" if isinstance(exc, CliError) else f"{type(exc).__name__}: "
        print(f"autoplan: error: {kind}{message}", file=sys.stderr)
        return EXIT_ERROR
