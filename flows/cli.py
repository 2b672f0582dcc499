"""`expertbits` command line: the same parameters as the flow and the Prefect UI form.

Options are generated from the flows' pydantic parameters, so the CLI, the flows and the UI cannot
drift apart. With no options, `expertbits quantize` and `expertbits league` run on the bundled
default pair into ./expertbits-store.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import shlex
import sys
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, get_args

from pydantic import BaseModel

from .params import LeagueParams, QuantizeParams, local_problems

# `serve` once served the Prefect deployments; vLLM serves models now (docs/serving.md), so the old
# name stays only as a deprecated alias
DEPRECATED_SERVE = "it serves Prefect deployments, not models; use `expertbits serve-deployments`"


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


def _add_options(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    for name, field in model.model_fields.items():
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description} (default: {json.dumps(default)})"
        ann = field.annotation
        if name == "storage_options":
            parser.add_argument("--storage-option", dest=name, action="append", metavar="KEY=VALUE",
                                help=f"{field.description}; repeatable, VALUE parsed as JSON when it can be")
        elif ann == list[list[int]]:
            parser.add_argument(_option(name), dest=name, nargs="+", metavar="B,B,...",
                                help=help_text + "; each set comma-separated, sets separated by spaces")
        elif getattr(ann, "__origin__", None) is list:
            parser.add_argument(_option(name), dest=name, metavar="X,X,...", help=help_text + "; comma-separated")
        elif ann is bool or set(get_args(ann)) == {bool, type(None)}:  # an optional bool: unset means auto
            parser.add_argument(_option(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            kind = next((t for t in (float, int) if ann is t or t in get_args(ann)), str)
            parser.add_argument(_option(name), dest=name, type=kind, metavar=name.upper(), help=help_text)


def _given(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The options given on the command line, as the flow parameters' values (unvalidated)."""
    given: dict[str, Any] = {k: v for k, v in vars(args).items() if k in model.model_fields and v is not None}
    for name, value in list(given.items()):
        ann = model.model_fields[name].annotation
        if ann == list[list[int]]:  # a word that is not a number stays a string, for pydantic to name
            given[name] = [[int(b) if b.strip().lstrip("-").isdigit() else b for b in s.split(",") if b.strip()]
                           for s in value]
        elif getattr(ann, "__origin__", None) is list:
            # pydantic parses each item ("false" to a bool too), with its own error for a bad one
            given[name] = [x.strip() for x in value.split(",") if x.strip()]
    if "storage_options" in given:
        given["storage_options"] = _parse_options(given["storage_options"])
    return given


def _parse_options(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE options, each VALUE parsed as JSON when it can be (use_ssl=false is False)."""
    opts = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            opts[key] = json.loads(value)
        except json.JSONDecodeError:
            opts[key] = value
    return opts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertbits", description="Expert-wise mixed-precision quantization of MoE models.")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="run the quantization flow",
                       description="Run download → statistics → allocation → quantization → kernel validation → "
                                   "evaluation as a Prefect flow and publish every artifact under one run prefix of the store. "
                                   "With no options it quantizes the bundled mixtral-tiny WordNet fine-tune (against its base) into ./expertbits-store.")
    _add_options(q, QuantizeParams)
    q.add_argument("--debug", action="store_true", help="show Prefect's log tracebacks and the full error")
    q.add_argument("--dask", metavar="ADDRESS", default=None,
                   help="run the per-layer work on a Dask cluster: a scheduler address (tcp://host:8786) or "
                        "local[:N] for N local worker processes, local-cuda[:N] for one per GPU "
                        "(default: $EXPERTBITS_DASK, else one process)")
    lg = sub.add_parser("league", help="compare allocators × budgets on one checkpoint pair",
                        description="Run download → statistics → calibration → league as a Prefect flow: every "
                                    "allocator at every budget and bit-width set is quantized and evaluated, and the table, "
                                    "a Pareto plot and a heatmap are published under leagues/<id>/ of the store.")
    _add_options(lg, LeagueParams)
    lg.add_argument("--debug", action="store_true", help="show Prefect's log tracebacks and the full error")
    lg.add_argument("--dask", metavar="ADDRESS", default=None,
                    help="run the per-layer work and the league's cells on a Dask cluster: a scheduler address "
                         "or local[:N], or local-cuda[:N] for one worker per GPU (default: $EXPERTBITS_DASK, else "
                         "one process)")
    gen = sub.add_parser("generate", help="load a quantized model and continue a prompt",
                         description="Load an expertbits-quantized folder (a run's quantization/ folder) the way a user "
                                     "does, experts running from their packed weights, and print what it generates. "
                                     "Encoder-decoder models (Switch) answer the prompt as their encoder input.")
    gen.add_argument("--model", required=True, help="the quantized folder (config.json + packed safetensors)")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: 32)")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--seed", type=int, default=0, help="seed for --sample (default: 0)")
    gen.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    gen.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                     help="the non-expert weights' and activations' dtype (default: auto, as stored)")
    exp = sub.add_parser("export", help="write a run's quantized model in a format other tools load",
                         description="Re-encode a run's quantized experts losslessly as compressed-tensors "
                                     "(pack-quantized, group-wise) and say which consumers load that export "
                                     "correctly. Experts of one layer at different widths are refused (no consumer "
                                     "loads them correctly): quantize with --granularity layer for a servable export.")
    exp.add_argument("run", help="a run folder of the store (runs/<id>) or its quantization/ folder")
    exp.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors"], help="export format")
    exp.add_argument("--out", required=True, help="folder to create (must not exist)")
    ev = sub.add_parser("evaluate", help="run lm-evaluation-harness tasks on a run's quantized model and its checkpoint",
                        description="Run lm-evaluation-harness tasks on a run's shipped quantized model (loaded by "
                                    "expertbits.load) and on the full-precision checkpoint it was made from, side by side. "
                                    "A published run never changes: this publishes the same run with its lm-eval results "
                                    "(DuckDB table lm_eval, lm-eval/lm_eval.parquet, the model card) as a new run, every "
                                    "other stage a cache hit, and prints its id. Tasks: lm-eval's own (offline, their "
                                    "datasets must be in the datasets cache), the zoo's (expertbits_supersense, "
                                    "expertbits_ppl_<text>), or --include-path's. See docs/evaluation.md.")
    ev.add_argument("run", help="a run id (with --store), or the run's folder or s3:// URI")
    ev.add_argument("--tasks", required=True, metavar="T1,T2", help="comma-separated lm-eval task names")
    ev.add_argument("--limit", type=int, default=None, help="at most this many examples per task (default: all)")
    ev.add_argument("--num-fewshot", type=int, default=None, help="examples in each prompt (default: each task's own)")
    ev.add_argument("--batch-size", type=int, default=8, help="requests per forward pass (default: 8)")
    ev.add_argument("--include-path", default=None, help="a folder of your own lm-eval task YAMLs")
    ev.add_argument("--store", default="expertbits-store", help="a local folder or s3://bucket/prefix")
    ev.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                    help="fsspec/s3fs option, e.g. endpoint_url=http://127.0.0.1:9000; repeatable")
    ev.add_argument("--debug", action="store_true", help="show Prefect's log tracebacks and the full error")
    ev.set_defaults(dask=None)
    ps = sub.add_parser("push", help="upload a run's quantized folder (model card included) to the Hugging Face hub",
                        description="Verify a run against its manifest, then upload its quantization/ folder (the model "
                                    "card included) to a hub repository as one commit, creating the repository (and the "
                                    "branch) if needed, and record the commit in the store (pushes/<run-id>/, listed by "
                                    "`expertbits runs`). The token is huggingface_hub's own: HF_TOKEN or `hf auth login`, "
                                    "never an option.")
    ps.add_argument("run", help="a run id (with --store), or the run's folder or s3:// URI")
    ps.add_argument("target", help="hf://org/name or hf://org/name@branch")
    ps.add_argument("--private", action="store_true", help="create the repository private (an existing one keeps its "
                                                           "visibility)")
    ps.add_argument("--store", default="expertbits-store", help="a local folder or s3://bucket/prefix")
    ps.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                    help="fsspec/s3fs option, e.g. endpoint_url=http://127.0.0.1:9000; repeatable")
    runs = sub.add_parser("runs", help="list the published runs of a store",
                          description="Every published run of a store (a prefix with its manifest), newest first: "
                                      "checkpoint, content digest, budget, allocator, KL and when. Read from the runs "
                                      "themselves; see README for DuckDB SQL over all runs.")
    runs.add_argument("--store", default="expertbits-store", help="a local folder or s3://bucket/prefix")
    runs.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                      help="fsspec/s3fs option, e.g. endpoint_url=http://127.0.0.1:9000; repeatable")
    runs.add_argument("--json", action="store_true", help="one JSON object per run instead of a table")
    ver = sub.add_parser("verify", help="re-hash every file of a run against its manifest",
                         description="Read every file of a published run again and compare its sha256 with the "
                                     "manifest: changed, missing and unlisted files are reported; exit status 1 if any.")
    ver.add_argument("run", help="a run id (with --store), or the run's folder or s3:// URI")
    ver.add_argument("--store", default="expertbits-store", help="a local folder or s3://bucket/prefix")
    ver.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                     help="fsspec/s3fs option, e.g. endpoint_url=http://127.0.0.1:9000; repeatable")
    gc = sub.add_parser("gc", help="remove what killed or failed runs left behind",
                        description="Remove orphans, and only orphans, in which nothing was written for --older-than: "
                                    "runs and leagues never made visible (incoming/), prefixes without their manifest, "
                                    "stage outputs without _stage.json, unfinished file writes, and unfinished downloads "
                                    "in the local checkpoint cache. Published runs and complete stage outputs are never "
                                    "touched.")
    gc.add_argument("--store", default="expertbits-store", help="a local folder or s3://bucket/prefix")
    gc.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                    help="fsspec/s3fs option, e.g. endpoint_url=http://127.0.0.1:9000; repeatable")
    gc.add_argument("--older-than", default="24h", metavar="AGE",
                    help="only what was last written longer ago than this: 90s, 30m, 6h, 2d (default: 24h)")
    gc.add_argument("--cache-dir", default=None,
                    help="the checkpoint cache to clean too (default: $EXPERTBITS_CACHE, else ~/.cache/expertbits)")
    gc.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    for name, text in (("deploy", "register the deployments on the current Prefect API (PREFECT_API_URL) for a work pool"),
                       ("serve-deployments", "serve the Prefect deployments from this process (no work pool needed); "
                                             "blocks. To serve a quantized model, see vLLM in docs/serving.md"),
                       ("serve", f"deprecated: the old name of serve-deployments ({DEPRECATED_SERVE})")):
        d = sub.add_parser(name, help=text, description=f"{text[0].upper()}{text[1:]}: quantize and league (UI forms), "
                           "quantize-nightly (cron), watch (interval) and requantize (triggered by the watcher's events).")
        if name == "deploy":
            d.add_argument("--work-pool", required=True, help="a process work pool (prefect work-pool create NAME --type process)")
        d.add_argument("--store", default="expertbits-store", help="artifact store of every deployment's runs")
        d.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                       help="non-secret fsspec/s3fs option, e.g. endpoint_url=…; credentials stay in the worker's env")
        d.add_argument("--watch", action="append", default=[], metavar="PREFIX",
                       help="a prefix to watch for new checkpoints (file://, s3://, hf://org/name); repeatable")
        d.add_argument("--watch-interval", type=int, default=300, help="seconds between watcher runs (default: 300)")
        d.add_argument("--watch-quantize", default="{}", metavar="JSON",
                       help='QuantizeParams for triggered runs, e.g. \'{"reference": "s3://m/base", "avg_bits": 2.5}\'')
        d.add_argument("--watch-reference", action="append", default=[], metavar="PREFIX=URI",
                       help="the reference of checkpoints landing under PREFIX (inside a watched prefix); repeatable. "
                            "A checkpoint under none is compared with the base model it declares, or with none")
        d.add_argument("--nightly-cron", default="0 3 * * *", help="cron of quantize-nightly (default: 0 3 * * *, UTC)")
        d.add_argument("--nightly-checkpoint", default=QuantizeParams.model_fields["checkpoint"].default,
                       help="what quantize-nightly quantizes")
    dev = sub.add_parser("dev", help="start or stop the local set: prefect server, worker, S3 server, deployments",
                         description="`up` starts a Prefect server, a process work pool with a worker and an S3-compatible "
                                     "server (moto) on loopback and registers every deployment; `down` stops exactly those "
                                     "processes, by the ids `up` recorded.")
    dev.add_argument("action", choices=["up", "down"])
    dev.add_argument("--dir", default=".expertbits-dev", help="state folder (default: .expertbits-dev)")
    dev.add_argument("--port", type=int, default=4200, help="Prefect server port (default: 4200)")
    dev.add_argument("--s3-port", type=int, default=9100, help="S3 server port (default: 9100)")
    dev.add_argument("--auth", action="store_true", help="the Prefect server asks for basic authentication (a random "
                                                         "string, printed with the variables a client needs)")
    return parser


def _settings(args: argparse.Namespace):
    from .deployments import Settings
    from .params import WatchParams, refuse_secrets

    try:
        options = refuse_secrets(dict(item.partition("=")[::2] for item in args.storage_option))
    except ValueError as e:
        raise DeployOptionError([f"--storage-option: {e}"]) from e
    try:
        quantize = json.loads(args.watch_quantize)
        if not isinstance(quantize, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise DeployOptionError([f"--watch-quantize: {e}; fix: give a JSON object of quantize options, "
                                 "e.g. '{\"avg_bits\": 2.5}'"]) from e
    references = {}
    for item in args.watch_reference:
        prefix, sep, uri = item.rpartition("=")  # the last '=': a watched prefix may hold one (date=2024/)
        if not (sep and prefix and uri):
            raise DeployOptionError([f"--watch-reference: {item!r} is not PREFIX=URI; fix: e.g. "
                                     "--watch-reference s3://models/incoming/mixtral=hf://mistralai/Mixtral-8x7B-v0.1"])
        references[prefix] = uri
    if references and not args.watch:
        raise DeployOptionError(["--watch-reference: maps prefixes inside a watched one; fix: give --watch PREFIX too"])
    if args.watch:  # every watch setting checked before anything is registered
        from pydantic import ValidationError

        try:
            QuantizeParams(**{k: v for k, v in quantize.items() if k not in ("checkpoint", "store", "storage_options")})
        except ValidationError as e:  # named as given: inside --watch-quantize
            raise DeployOptionError(option_errors(e, QuantizeParams, {
                f: f"--watch-quantize {f}" for f in QuantizeParams.model_fields})) from e
        try:
            references = WatchParams(prefixes=args.watch, store=args.store, storage_options=options, quantize=quantize,
                                     references=references).references
        except ValidationError as e:
            raise DeployOptionError(option_errors(e, WatchParams, {
                "prefixes": "--watch", "references": "--watch-reference", "storage_options": "--storage-option",
                "quantize": "--watch-quantize"})) from e
    return Settings(store=args.store, storage_options=options, watch_prefixes=tuple(args.watch),
                    watch_interval_s=args.watch_interval, watch_quantize=quantize,
                    watch_references=references,
                    nightly_cron=args.nightly_cron, nightly_checkpoint=args.nightly_checkpoint)


class DeployOptionError(ValueError):
    """Deployment options that cannot be used, one line per problem (option, problem, fix)."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("\n".join(lines))


def operate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import deployments, dev

    if args.command == "serve":
        print(f"expertbits: `expertbits serve` is deprecated: {DEPRECATED_SERVE}", file=sys.stderr)

    if args.command == "dev":
        try:
            if args.action == "up":
                state = dev.up(Path(args.dir), args.port, args.s3_port, auth=args.auth)
                auth = ""
                if "auth" in state:
                    auth = (f"export PREFECT_API_AUTH_STRING=\"$(cat {shlex.quote(state['auth'])})\"\n"
                            "(the UI asks for the same string)\n")
                print(f"Prefect UI: {state['ui']}\nS3 endpoint: {state['s3']} (bucket {dev.BUCKET}; drop checkpoints "
                      f"under s3://{dev.BUCKET}/incoming/<name>/)\nexport PREFECT_API_URL={state['api']}\n{auth}"
                      f"stop everything with: expertbits dev down --dir {args.dir}")
            else:
                stopped = dev.down(Path(args.dir))
                print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        except dev.DevError as e:
            print(f"expertbits: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        settings = _settings(args)
    except DeployOptionError as e:
        print("expertbits: invalid deployment options:\n" + "\n".join(f"  {line}" for line in e.lines), file=sys.stderr)
        return 2
    try:
        if args.command == "deploy":
            ids = deployments.deploy(settings, args.work_pool)
            print(f"registered {len(ids)} deployments for work pool {args.work_pool!r}")
        else:
            deployments.serve(settings)
    except Exception as e:
        if (message := _refused(e)) is None:
            raise
        print(message, file=sys.stderr)
        return 1
    return 0


def _refused(e: BaseException) -> str | None:
    """The error and its fix when the Prefect API refused us for want of its auth string, else None
    (a 401 from anyone else, the hub for one, is not this: only Prefect's own client errors for a
    request to the configured API count)."""
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import get_current_settings

    seen = set()
    while e is not None and id(e) not in seen:  # the error itself, or what it was raised from
        seen.add(id(e))
        if isinstance(e, PrefectHTTPStatusError):
            break
        e = e.__cause__ or e.__context__
    api = get_current_settings().api
    if not isinstance(e, PrefectHTTPStatusError) or e.response.status_code != 401 or not api.url:
        return None
    import httpx

    ours, asked = httpx.URL(api.url), e.request.url  # compared normalised: host case, default ports
    if (asked.scheme, asked.host, asked.port) != (ours.scheme, ours.host, ours.port) or not (
            asked.path + "/").startswith(ours.path.rstrip("/") + "/"):
        return None
    given = "a wrong" if api.auth_string else "no"
    return (f"expertbits: {api.url} refused the request (401): this process sends {given} auth string\n"
            "  fix: set PREFECT_API_AUTH_STRING to the server's (compose: PREFECT_AUTH_STRING in infra/.env; the dev "
            "set: `expertbits dev up --auth` prints how)")


def list_runs(args: argparse.Namespace) -> int:
    from expertbits.tasks.errors import ExpertbitsError
    from expertbits.tasks.store import catalog
    from expertbits.tasks.store.storage import Store

    options = _parse_options(args.storage_option)
    try:
        frame = catalog.list_runs(Store(args.store, options))
    except (ExpertbitsError, OSError) as e:
        print(f"expertbits: cannot read the store {args.store}: {e}", file=sys.stderr)
        return 1
    if args.json:
        for row in frame.to_dict(orient="records"):
            print(json.dumps(row, default=str))
    else:
        print(catalog.table(frame))
    return 0


def verify(args: argparse.Namespace) -> int:
    from expertbits.tasks.errors import ExpertbitsError
    from expertbits.tasks.store.storage import Store
    from expertbits.tasks.store.verify import verify_run

    options = _parse_options(args.storage_option)
    try:
        if "/" in args.run:  # the run's own folder or URI
            report = verify_run(Store(args.run, options))
        else:
            report = verify_run(Store(args.store, options), f"runs/{args.run}")
    except (ExpertbitsError, OSError) as e:
        print(f"expertbits: {e}", file=sys.stderr)
        return 1
    for kind in ("changed", "missing", "extra"):
        for rel in report[kind]:
            print(f"{kind}: {rel}")
    verdict = "intact" if report["ok"] else "DIFFERS from its manifest"
    print(f"{report['run']}: {report['files']} files, {verdict}")
    return 0 if report["ok"] else 1


def collect_garbage(args: argparse.Namespace) -> int:
    from pathlib import Path

    from expertbits.tasks.checkpoints.fetch import default_cache_dir
    from expertbits.tasks.errors import ExpertbitsError
    from expertbits.tasks.store import gc
    from expertbits.tasks.store.storage import Store

    options = _parse_options(args.storage_option)
    try:
        age = gc.parse_age(args.older_than)
        if age < 3600:  # a publish re-hashing a large run writes nothing for minutes
            raise ValueError(f"{args.older_than} is too young: a run still writing could lose files; give 1h or more")
    except ValueError as e:
        print(f"expertbits: --older-than: {e}", file=sys.stderr)
        return 2
    try:
        found = gc.collect(Store(args.store, options), age, Path(args.cache_dir or default_cache_dir()), args.dry_run)
    except Exception as e:  # any transport or credential error: one line, not a traceback
        if not isinstance(e, (ExpertbitsError, OSError)) and type(e).__module__.split(".")[0] not in ("botocore",
                                                                                                     "aiobotocore"):
            raise
        print(f"expertbits: cannot clean {args.store}: {e}", file=sys.stderr)
        return 1
    for o in found:
        print(("would remove: " if args.dry_run else "removed: ") + gc.describe(o))
    print(f"{len(found)} orphans {'found' if args.dry_run else 'removed'} (older than {args.older_than})")
    return 0


def export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from expertbits.tasks.errors import ExpertbitsError
    from expertbits.tasks.model.export import export as export_run

    try:
        result = export_run(Path(args.run), Path(args.out), args.format)
    except ExpertbitsError as e:
        print(f"expertbits: {e}", file=sys.stderr)
        return 1
    print(f"exported {result['modules']} expert matrices as {result['format']} to {args.out}")
    for tool, verdict in result["consumers"].items():
        print(f"  {tool}: {verdict}")
        if "WRONG" in verdict or "fails" in verdict:
            print(f"expertbits: warning: {tool} {verdict}", file=sys.stderr)
    return 0


def _run_location(run: str, store: str) -> tuple[str, str]:
    """(store, run id) of a run named by id (in `store`) or by its folder or URI, <store>/runs/<id>."""
    from expertbits.tasks.errors import ExpertbitsError

    if "/" not in run:
        return store, run
    parts = run.rstrip("/").rsplit("/", 2)
    if len(parts) < 3 or parts[1] != "runs" or not parts[2]:
        raise ExpertbitsError(f"{run}: not a run folder (<store>/runs/<id>)",
                              "name a run by its id with --store, or give its runs/<id> folder")
    return parts[0], parts[2]


def push(args: argparse.Namespace) -> int:
    from expertbits.tasks.errors import ExpertbitsError
    from expertbits.tasks.store import push as hub
    from expertbits.tasks.store.storage import Store

    options = _parse_options(args.storage_option)
    try:
        store, rid = _run_location(args.run, args.store)
        record = hub.push(Store(store, options), rid, args.target, args.private)
    except (ExpertbitsError, OSError) as e:
        print(f"expertbits: {e}", file=sys.stderr)
        return 1
    print(f"pushed run {record['run_id']} ({record['files']} files) to {record['repo_id']}@{record['branch']}: "
          f"commit {record['commit']}\n{record['commit_url']}")
    return 0


def evaluate_params(args: argparse.Namespace) -> dict[str, Any]:
    """The quantize flow's parameters that remake the run `args.run` with --lm-eval-tasks: its own
    recorded parameters (every stage a cache hit), the store it was read from, the lm-eval options."""
    from expertbits.tasks.errors import ExpertbitsError
    from expertbits.tasks.store.storage import Store

    options = _parse_options(args.storage_option)
    store, rid = _run_location(args.run, args.store)
    try:
        manifest = json.loads(Store(store, options).read_bytes(f"runs/{rid}/manifest.json"))
        parameters = dict(manifest["summary"]["parameters"])
        args.original_stages = dict(manifest["stages"])  # checked against the new run's (main)
    except FileNotFoundError as e:
        raise ExpertbitsError(f"{store}/runs/{rid}: no published run (no manifest.json)",
                              "`expertbits runs --store STORE` lists the runs") from e
    except OSError as e:  # the store itself: credentials, network
        raise ExpertbitsError(f"{store}: cannot read runs/{rid}/manifest.json ({type(e).__name__}: {e})",
                              "check the store and its --storage-option settings") from e
    except (ValueError, KeyError, TypeError) as e:
        raise ExpertbitsError(f"{store}/runs/{rid}/manifest.json is not a run manifest ({type(e).__name__}: {e})",
                              "republish the run (rerun the flow: every stage is cached)") from e
    if "avg_bits" not in parameters:
        raise ExpertbitsError(f"{store}/runs/{rid}: not a quantize run", "name a run of `expertbits quantize`")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    parameters = {k: v for k, v in parameters.items() if k in QuantizeParams.model_fields}
    return {**parameters, "store": store, "storage_options": options, "event_id": None, "lm_eval_tasks": tasks,
            "lm_eval_limit": args.limit, "lm_eval_num_fewshot": args.num_fewshot,
            "lm_eval_batch_size": args.batch_size, "lm_eval_include_path": args.include_path}


def generate(args: argparse.Namespace) -> int:
    import torch

    from expertbits.tasks.errors import ExpertbitsError
    from expertbits.tasks.model.load import load

    if args.max_new_tokens < 1:
        print("expertbits: --max-new-tokens must be at least 1", file=sys.stderr)
        return 2
    try:
        model, tokenizer = load(args.model, device=args.device,
                                dtype=args.dtype if args.dtype == "auto" else getattr(torch, args.dtype))
    except ExpertbitsError as e:
        print(f"expertbits: {e}", file=sys.stderr)
        return 1
    inputs = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    torch.manual_seed(args.seed)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    # an encoder-decoder's output starts with its decoder start token; a decoder-only's with the prompt
    new = out[0, 1:] if model.config.is_encoder_decoder else out[0, inputs["input_ids"].shape[1]:]
    # special tokens stay visible: a span-corruption model (Switch) answers in <extra_id_N> sentinels
    print(tokenizer.decode(new, skip_special_tokens=False))
    return 0


def option_errors(error: Exception, model: type[BaseModel], flags: dict[str, str] | None = None) -> list[str]:
    """One line per problem with the options, naming the option as the user wrote it (`flags`:
    field -> how it is given, else its --option) and the fix (not pydantic's report)."""
    from pydantic import ValidationError

    from expertbits.tasks.errors import ExpertbitsError

    flags = {**_FLAGS.get(model, {}), **(flags or {})}
    if not isinstance(error, ValidationError):
        option = getattr(error, "option", None)
        text = str(error).replace("\n  fix:", "; fix:")
        return [f"{flags.get(option, _option(option))}: {text}" if option else text]
    lines = []
    for err in error.errors():
        cause = (err.get("ctx") or {}).get("error")
        name = next((str(x) for x in err["loc"] if isinstance(x, str)), None) or getattr(cause, "option", None)
        if isinstance(cause, ExpertbitsError):
            problem, fix = cause.problem, cause.fix
        elif cause is not None:
            problem, fix = str(cause), f"see expertbits {_COMMAND.get(model, 'deploy')} --help"
        else:
            problem, fix = err["msg"][:1].lower() + err["msg"][1:], _FIXES.get(err["type"], "see expertbits {command} --help")
            ctx = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in (err.get("ctx") or {}).items()}
            fix = fix.format(command=_COMMAND.get(model, "deploy"), **ctx)
            if err["loc"] and err["type"] != "extra_forbidden":
                problem = f"got {err['input']!r}: {problem}"
        lines.append(f"{flags.get(name, _option(name)) if name else 'options'}: {problem}; fix: {fix}")
    return lines


_COMMAND = {QuantizeParams: "quantize", LeagueParams: "league"}
# `expertbits evaluate` gives the lm-eval fields of QuantizeParams under its own, shorter options
_EVALUATE_FLAGS = {"lm_eval_tasks": "--tasks", "lm_eval_limit": "--limit", "lm_eval_num_fewshot": "--num-fewshot",
                   "lm_eval_batch_size": "--batch-size", "lm_eval_include_path": "--include-path"}
_FLAGS = {  # fields whose option is not simply --field-name (errors raised by a quantize run's checks name
            # the quantize field; the league sets lists of them)
    QuantizeParams: {"storage_options": "--storage-option"},
    LeagueParams: {"storage_options": "--storage-option", "quantizer": "--quantizers", "allocator": "--allocators",
                   "avg_bits": "--budgets", "bit_widths": "--bit-sets", "granularity": "--granularities"},
}
_FIXES = {  # pydantic's error types, as what to give instead
    "less_than_equal": "give at most {le}", "less_than": "give less than {lt}", "greater_than": "give more than {gt}",
    "greater_than_equal": "give at least {ge}", "int_parsing": "give a whole number", "int_from_float": "give a whole number",
    "float_parsing": "give a number", "bool_parsing": "give true or false", "too_short": "give at least {min_length} value(s)",
    "string_pattern_mismatch": "match {pattern}", "extra_forbidden": "remove it; see expertbits {command} --help",
}


class _NoTraceback(logging.Formatter):
    """The console formatter without exception tracebacks: a failed run ends with expertbits' own
    line (the error and its fix); `--debug` keeps Prefect's tracebacks."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None  # restored: other handlers see the record whole
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


@contextmanager
def _quiet_tracebacks(debug: bool) -> Iterator[None]:
    """No tracebacks on the console while the flow runs (unless `debug`), and none of Prefect's
    INFO lines once the process exits (the temporary server's goodbye would follow our last line).
    The console's formatters are restored after the run; the log level changes only at exit."""
    if debug:
        yield
        return
    handlers = [h for h in logging.getLogger().handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h.formatter, _NoTraceback)]
    saved = [h.formatter for h in handlers]
    for handler in handlers:
        handler.setFormatter(_NoTraceback(handler.formatter))
    try:
        yield
    finally:
        for handler, formatter in zip(handlers, saved):
            handler.setFormatter(formatter)
        # registered after the temporary server's own stop, so (last in, first out) it runs first
        atexit.register(logging.getLogger("prefect").setLevel, logging.WARNING)


def _failure(e: BaseException, debug: bool) -> int:
    from expertbits.tasks.errors import ExpertbitsError

    if (message := _refused(e)) is not None and not debug:
        print(message, file=sys.stderr)
        return 1
    if isinstance(e, ExpertbitsError):
        print(f"expertbits: {e}", file=sys.stderr)
        return 1
    if debug:
        raise e
    print(f"expertbits: the run failed: {type(e).__name__}: {e}\n  fix: rerun with --debug for the traceback; if the "
          "cause is not your input or environment, report it with that output", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("generate", "export", "runs", "verify", "gc", "push", "deploy", "serve-deployments", "serve",
                        "dev"):
        _prefect_defaults()
        return {"generate": generate, "export": export, "runs": list_runs, "verify": verify, "gc": collect_garbage,
                "push": push}.get(
            args.command, operate)(args)
    if args.command == "evaluate":
        try:
            given = evaluate_params(args)
        except ValueError as e:  # ExpertbitsError: no such run, a damaged manifest
            print(f"expertbits: {e}", file=sys.stderr)
            return 1
        model = QuantizeParams
    else:
        model = {"quantize": QuantizeParams, "league": LeagueParams}[args.command]
        given = _given(args, model)
    defaults = {n: f.get_default(call_default_factory=True) for n, f in model.model_fields.items()}
    problems = local_problems({**defaults, **given})  # paths and names before Prefect starts, whatever else is wrong
    try:
        params = model(**given)
    except ValueError as e:  # pydantic's ValidationError is one
        problems = option_errors(e, model, _EVALUATE_FLAGS if args.command == "evaluate" else None) + problems
    if problems:
        print("expertbits: invalid options:\n" + "\n".join(f"  {p}" for p in problems), file=sys.stderr)
        return 2
    _prefect_defaults()

    from .league import league_table
    from .quantize import quantize_moe
    from .scale import shared_api, task_runner

    flow = league_table if args.command == "league" else quantize_moe
    api = nullcontext()
    try:
        if args.dask is not None or os.environ.get("EXPERTBITS_DASK"):
            flow, api = flow.with_options(task_runner=task_runner(args.dask)), shared_api(args.dask)
        with _quiet_tracebacks(args.debug), api:
            manifest = flow(params)
    except Exception as e:
        return _failure(e, args.debug)
    s = manifest.summary
    # the quantization key covers every stage the model depends on (checkpoint, statistics,
    # calibration, allocation, quantizer); validation and evaluation may differ (another kernel
    # device, another evaluation text) without the model differing: said, not an error
    original = getattr(args, "original_stages", {})
    rebuilt = [s for s in ("quantization",) if s in original and manifest.stages.get(s) != original[s]]
    redone = sorted(s for s, key in original.items() if s not in ("lm-eval", *rebuilt) and manifest.stages.get(s) != key)
    lines = [f"Λ: {_reference_line(s.get('reference'))}", _text_line("calibration text", s.get("routing") or s.get("calibration")),
             _text_line("evaluation text", s.get("evaluation"))]
    if args.command == "league":
        print(f"\nleague {manifest.run_id}: {s['league']['cells']} cells; ranked first: {s['league']['ranked_first']}")
    else:
        ev, al = s["evaluation"], s["allocation"]
        print(f"\nrun {manifest.run_id}: {al['achieved_avg_bits']} avg bits, KL {ev['kl']:.5f}, "
              f"ppl {ev['ppl_fp']:.2f} -> {ev['ppl_quant']:.2f}, evaluated on {ev.get('device', 'cpu')} "
              f"({ev.get('dtype', 'float32')})")
        if "lm-eval" in s:
            from expertbits.tasks.store.storage import Store

            lines.insert(0, "lm-eval, full precision vs quantized:\n"
                         + Store(params.store, params.storage_options).read_bytes(
                             f"runs/{manifest.run_id}/lm-eval/lm_eval.md").decode().rstrip())
        if "fraction_of_bf16" in (q := s["quantization"]):
            lines.insert(0, f"size: {q['bytes'] / 1e6:.2f} MB, {100 * q['fraction_of_bf16']:.1f}% of bf16, "
                            f"{q['model_bits_per_parameter']:.2f} bits per parameter over the whole model "
                            f"({q['effective_bits']:.2f} in the routed experts"
                            + (f"; {q['dense_matrices']} dense layers packed at {'/'.join(map(str, q['dense_bits']))} bits"
                               if q.get("dense_matrices") else "; dense layers as stored") + ")")
    print("\n".join(line for line in lines if line) + f"\nartifacts: {manifest.uri}")
    if redone and not rebuilt:
        print(f"note: the same quantized model as run {args.run}; its {', '.join(redone)} stage"
              f"{'s were' if len(redone) > 1 else ' was'} computed again here (another kernel device or evaluation "
              "text, or another expertbits or library version)")
    if rebuilt:  # `evaluate` promised the run's own model: say plainly that this is another one
        print(f"expertbits: run {manifest.run_id} was rebuilt, not reused: its quantized model differs from run "
              f"{args.run}'s (the checkpoint or the calibration text changed, or expertbits, a library or the device "
              "differs from what made the run), so its lm-eval results are for a different model\n"
              "  fix: evaluate with the expertbits and library versions, device and inputs that made the run; or "
              "keep the new run and its results", file=sys.stderr)
        return 1
    return 0


def _reference_line(ref: dict | None) -> str:
    if not ref:
        return "(no record of the reference in this run)"
    if ref["uri"]:
        return f"router-norm change against {ref['uri']} ({ref['reason']})"
    return f"final router norm, no reference: {ref['reason']}"


def _text_line(what: str, summary: dict | None) -> str | None:
    if not summary or "text" not in summary:
        return None
    return f"{what}: {summary['text']} ({summary.get('windows', '?')} windows of {summary.get('seq_len', '?')} tokens)"


if __name__ == "__main__":
    sys.exit(main())
