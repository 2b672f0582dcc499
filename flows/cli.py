"""`expertbits` command line: the same parameters as the flow and the Prefect UI form.

Options are generated from `QuantizeParams`, so the CLI, the flow and the UI cannot drift apart.
With no options, `expertbits quantize` runs on the bundled micro-mixtral pair into ./expertbits-store.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, get_args

from .params import QuantizeParams


def _prefect_defaults() -> None:
    # An ephemeral Prefect API starts in ~17 s on a fresh machine; the default 20 s timeout is too tight.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if home := os.environ.get("PREFECT_HOME"):
        os.makedirs(os.path.expanduser(home), exist_ok=True)  # Prefect creates the folder, not its parents
    # torch threads oversubscribe small CPUs alongside the Prefect server; one thread is faster there.
    if (os.cpu_count() or 1) <= 4:
        os.environ.setdefault("OMP_NUM_THREADS", "1")


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_options(parser: argparse.ArgumentParser) -> None:
    for name, field in QuantizeParams.model_fields.items():
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description} (default: {json.dumps(default)})"
        ann = field.annotation
        if name == "storage_options":
            parser.add_argument("--storage-option", dest=name, action="append", metavar="KEY=VALUE",
                                help=f"{field.description}; repeatable, VALUE parsed as JSON when it can be")
        elif name == "bit_widths":
            parser.add_argument(_option(name), dest=name, metavar="B,B,...", help=help_text + "; comma-separated")
        else:
            kind = next((t for t in (float, int) if ann is t or t in get_args(ann)), str)
            parser.add_argument(_option(name), dest=name, type=kind, metavar=name.upper(), help=help_text)


def _params(args: argparse.Namespace) -> QuantizeParams:
    given: dict[str, Any] = {k: v for k, v in vars(args).items() if k in QuantizeParams.model_fields and v is not None}
    if "bit_widths" in given:
        given["bit_widths"] = [int(b) for b in given["bit_widths"].split(",") if b.strip()]
    if "storage_options" in given:
        opts = {}
        for item in given["storage_options"]:
            key, _, value = item.partition("=")
            try:
                opts[key] = json.loads(value)
            except json.JSONDecodeError:
                opts[key] = value
        given["storage_options"] = opts
    return QuantizeParams(**given)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertbits", description="Expert-wise mixed-precision quantization of MoE models.")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="run the six-stage quantization flow",
                       description="Run download → statistics → allocation → quantization → kernel validation → "
                                   "evaluation as a Prefect flow and publish every artifact under one run prefix of the store. "
                                   "With no options it quantizes the bundled micro-mixtral pair into ./expertbits-store.")
    _add_options(q)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pydantic import ValidationError

    try:
        params = _params(args)
    except ValidationError as e:
        print(f"expertbits: invalid options:\n{e}", file=sys.stderr)
        return 2
    _prefect_defaults()
    from expertbits.tasks.errors import ExpertbitsError

    from .quantize import quantize_moe

    try:
        manifest = quantize_moe(params)
    except ExpertbitsError as e:
        print(f"expertbits: {e}", file=sys.stderr)
        return 1
    ev, al = manifest.summary["evaluation"], manifest.summary["allocation"]
    print(f"\nrun {manifest.run_id}: {al['achieved_avg_bits']} avg bits, KL {ev['kl']:.5f}, "
          f"ppl {ev['ppl_fp']:.2f} -> {ev['ppl_quant']:.2f}\nartifacts: {manifest.uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
