"""The flows' parameters: pydantic models shared by the CLI, the flows and the Prefect UI forms."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from expertbits.tasks.allocation.allocators import ALLOCATORS, NEEDS_ERROR, NEEDS_GPTQ, check
from expertbits.tasks.allocation.budget import GRANULARITIES, AllocationConfig
from expertbits.tasks.errors import ExpertbitsError
from expertbits.tasks.measure.harness import HarnessConfig
from expertbits.tasks.measure.league import DEFAULT_ALLOCATORS, LM_EVAL, TASKS, Grid
from expertbits.tasks.quantization.dense import DenseWidths
from expertbits.tasks.quantization.method import METHODS, QuantizerConfig

# The bundled default: the zoo's Mixtral fine-tuned on WordNet supersenses. Its model card declares
# its base (zoo://mixtral-tiny/base), so the no-option run measures Λ against it with no default
# reference that could leak into a run of another checkpoint.
DEFAULT_CHECKPOINT = "zoo://mixtral-tiny/wordnet"


# option names that hold credentials (after camelCase and hyphens become snake_case); `*_key_id`
# (a KMS key id) and `key_prefix` name no secret, but an access key id is a credential
SECRET_WORDS = {"secret", "token", "password", "passwd", "credential", "credentials", "session", "auth",
                "authorization", "apikey", "signature"}
SECRET_NAMES = {"key", "access_key", "aws_access_key_id", "connection_string", "sse_customer_key", "customer_key",
                "private_key"}
USERINFO = re.compile(r"://[^/@\s]+@")


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", str(name)).replace("-", "_").lower()


def refuse_secrets(options: Any, where: str = "storage_options") -> Any:
    """Storage options travel in parameters, events and manifests, so they must hold no secret."""
    fix = ("parameters, events and manifests are stored and shown in the UI. Put credentials in the worker's "
           "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) or a Prefect secret block")
    if isinstance(options, dict):
        for name, value in options.items():
            snake = _snake(name)
            words = set(snake.split("_"))
            allowed = snake.endswith("_key_id") and snake != "aws_access_key_id" or snake == "key_prefix"
            if snake in SECRET_NAMES or words & SECRET_WORDS or ("key" in words and not allowed):
                raise ValueError(f"{where} must not carry credentials ({name!r}): {fix}")
            refuse_secrets(value, f"{where}.{name}")
    elif isinstance(options, (list, tuple)):
        for i, value in enumerate(options):
            refuse_secrets(value, f"{where}[{i}]")
    elif isinstance(options, str) and USERINFO.search(options):
        raise ValueError(f"{where} holds a URL with a user or password: {fix}")
    return options


def local_problems(values: dict[str, Any]) -> list[str]:
    """What the command line can check on this machine before any work, one line per problem
    naming the option and the fix: local checkpoints (with a tokenizer, except a reference's)
    and texts exist, bundled names are known, URIs are well formed, the store can be a folder or
    a bucket and the cache a local folder. Values are as given (checked even when other options
    are invalid). The flow checks the rest as it fetches; it is not a check of the parameters, as a
    worker may see other paths than the machine that starts a deployment."""
    from expertbits.tasks.checkpoints.fetch import check_source
    from expertbits.tasks.checkpoints.texts import check_text
    from expertbits.tasks.errors import ExpertbitsError

    reference = values.get("reference")
    checks = [("checkpoint", check_source), ("reference", lambda uri: check_source(uri, tokenizer=False)),
              ("calibration_text", check_text), ("eval_text", check_text), ("store", _check_store),
              ("cache_dir", _check_cache)]
    problems = []
    for option, check_one in checks:
        value = values.get(option)
        if not isinstance(value, str) or not value or option == "reference" and reference.strip().lower() == "none":
            continue
        try:
            check_one(value)
        except ExpertbitsError as e:
            problems.append(f"--{option.replace('_', '-')}: {e.problem}; fix: {e.fix}")
    return problems


def _check_store(where: str) -> None:
    """A store: s3://bucket[/prefix], or a local folder that is absent (it is created) or a folder."""
    from expertbits.tasks.errors import ExpertbitsError

    if "://" in where and not where.startswith("file://"):
        if not where.startswith("s3://") or len(where.removeprefix("s3://").strip("/")) == 0:
            raise ExpertbitsError(f"{where}: not a local folder or s3://bucket[/prefix]", "e.g. ./expertbits-store or s3://bucket/store")
        return
    _check_cache(where.removeprefix("file://"))


def _check_cache(where: str) -> None:
    """A local folder, absent (it is created) or a folder, not a file."""
    from expertbits.tasks.errors import ExpertbitsError

    if "://" in where:
        raise ExpertbitsError(f"{where}: the checkpoint cache is a local folder", "name a local folder, e.g. ~/.cache/expertbits")
    path = Path(where).expanduser()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ExpertbitsError(f"{where}: {existing} is a file, not a folder", "name a folder (it is created if absent)")


class CommonParams(BaseModel):
    """What every expertbits flow reads: checkpoints, texts, store."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(DEFAULT_CHECKPOINT, description=(
        "The MoE checkpoint to quantize: a folder, file://, s3://bucket/prefix, hf://org/name@revision or zoo://family/variant"))
    reference: str | None = Field(None, description=(
        "The checkpoint it was fine-tuned from, for the router-norm change Λ (same URI forms as checkpoint). Empty: "
        "the base_model the checkpoint declares (model card or config.json) when it can be fetched, else none; "
        "'none': no reference. Without one, Λ is the final router norm (the paper's proxy) and the run says so"))
    group_size: int = Field(64, ge=8, le=4096, description="Weights per quantization group along the input dimension")
    zeta: float = Field(3.0, gt=0, description="MaxVar promotion threshold ζ (an expert passes those with ζ·MaxVar below its own)")
    maxvar_definition: str = Field("max-row", description=(
        "MaxVar as the paper defines it ('max-row': max over rows of the row variance) or as the reference code "
        "computes it ('max-norm-row': variance of the largest-norm row)"))
    store: str = Field("expertbits-store", description="Artifact store: a local folder or s3://bucket/prefix")
    storage_options: dict[str, Any] = Field(default_factory=dict, description=(
        "fsspec/s3fs options for s3:// URIs, e.g. {\"endpoint_url\": \"http://127.0.0.1:9000\"}; keep secrets in AWS_* env vars"))
    eval_text: str = Field("zoo://text/wordnet-supersense-test", description="Held-out text for KL and perplexity: a file, s3:// or zoo://text/name")
    eval_windows: int = Field(16, ge=1, description="Number of evaluation windows")
    eval_seq_len: int = Field(256, ge=8, description="Tokens per evaluation and calibration window")
    calibration_text: str = Field("zoo://text/wordnet-supersense-train", description=(
        "Text routed through the model for activation frequency, routing weight and sensitivity (not the evaluation text)"))
    calibration_windows: int = Field(16, ge=1, description="Number of calibration windows")
    cache_dir: str | None = Field(None, description="Local checkpoint cache (default: $EXPERTBITS_CACHE or ~/.cache/expertbits)")
    clip: bool = Field(False, description=(
        "Clipping search of each group's range (shrink factors 1 to 0.5, least error kept): for rtn by weight "
        "error, for gptq weighted by the expert's Hessian diagonal"))
    rotate: bool = Field(False, description=(
        "Quantize each expert matrix in a rotated basis, W R with R a random-signed Hadamard on its inputs, and rotate "
        "its inputs when it runs (kernels/hadamard.py): outliers spread over the group, less error at 2-3 bits; "
        "format version 3, not exportable"))
    gptq_damp: float = Field(0.01, gt=0, lt=1, description="GPTQ dampening, a fraction of the mean Hessian diagonal")
    gptq_act_order: bool = Field(True, description="GPTQ: quantize columns in order of decreasing Hessian diagonal")
    gptq_min_tokens: int = Field(16, ge=1, description=(
        "GPTQ: an expert routed fewer calibration tokens is rounded to nearest instead (reported in the run's "
        "calibration coverage; never zeroed)"))
    gptq_weighted: bool = Field(True, description=(
        "GPTQ: weight each token's Hessian term by the routing weight the router gave it (the expert's share of "
        "that token's output)"))
    device: str = Field("auto", description=(
        "Where the heavy stages compute (routing, calibration error, GPTQ, quantization, evaluation, league cells): "
        "'auto' (a CUDA GPU when the machine the flow runs on has one, else the CPU; EXPERTBITS_DEVICE in the flow "
        "run's environment overrides it), 'cpu', 'cuda' or 'cuda:N'. On a GPU the model computes in its own dtype "
        "(bf16/fp16), GPTQ's Hessians in fp32"))

    @field_validator("reference", mode="before")
    @classmethod
    def _empty_is_none(cls, v):
        return v or None

    @field_validator("storage_options")
    @classmethod
    def _no_secrets(cls, v):
        return refuse_secrets(v)

    @field_validator("device")
    @classmethod
    def _device_form(cls, v):
        from expertbits.tasks.placement import check

        return check(v)  # a well-formed name; whether the machine has it, the flow checks first (check-device)


class QuantizeParams(CommonParams):
    """Quantize a fine-tuned MoE checkpoint with per-expert bit-widths."""

    avg_bits: float = Field(2.5, gt=0, le=8, description="Average bits per routed expert, between the smallest and largest bit-width")
    bit_widths: list[int] = Field([2, 3, 4], min_length=1, description="Available expert bit-widths")
    # 'auto' is the best measured on the zoo (docs/results/2026-12-07-quality-levers.md): output-error
    # under GPTQ, routed-error (first across the RTN league tables) under RTN; "paper" is the paper's method
    allocator: str = Field("auto", description=(
        f"Who gets the bits: {', '.join(ALLOCATORS)} (see tasks/allocation/allocators.py), or 'auto': output-error "
        "with --quantizer gptq, routed-error with rtn"))
    scheme: str = Field("two-tier", description=(
        "Tier counts for ranking allocators: 'two-tier' (the two widths around the budget) or 'three-tier' "
        "(three equally spaced widths, the paper's region rules)"))
    seed: int = Field(0, ge=0, description="Seed of the random allocator")
    granularity: str = Field("expert", description=(
        "'expert': every routed expert its own width; 'layer': one width per MoE layer (widths vary across layers), "
        "what vLLM can serve; needs a cost-based allocator (pmq, weight-error, routed-error) or uniform"))
    budget_scope: str = Field("auto", description=(
        "Where --avg-bits holds: 'layer' (every MoE layer at that average, the paper's rule) or 'model' (one solve "
        "over every routed expert of the model: a layer whose experts lose more per bit takes bits from one that "
        "loses less; cost-based allocators, per-expert widths), or 'auto': model for output-error with per-expert "
        "widths (its costs compare across layers), else layer"))
    symmetric: bool = Field(False, description=(
        "Symmetric quantization (every zero point at the middle code): exports without zero points, which plain "
        "transformers loads; asymmetric (default) is more accurate"))
    quantizer: str = Field("auto", description=(
        f"How each expert matrix is quantized: {', '.join(METHODS)} ('gptq': routed, sequential GPTQ on the "
        "calibration text, see tasks/quantization/gptq_sequential.py; 'rtn': data-free, much faster at real size), "
        "or 'auto': gptq for decoder-only MoE models, rtn for encoder-decoder ones (Switch), which GPTQ does not support"))
    rotate: bool | None = Field(None, description=(
        "Quantize each expert matrix in a rotated basis, W R with R a random-signed Hadamard on its inputs, and rotate "
        "its inputs when it runs (kernels/hadamard.py); format version 3, not exportable. Default: on with gptq "
        "(less KL on the zoo), off with rtn (no gain measured)"))
    dense_bits: int | None = Field(None, description=(
        "Also quantize every linear layer of the decoder layers (attention, shared experts, dense MLPs; not the "
        "routers) with GPTQ at this width, into the same packed format (tasks/quantization/dense.py); default: only "
        "the routed experts, like for like with other tools"))
    dense_override: list[str] = Field([], description=(
        "GLOB=BITS or GLOB=keep: a width for the dense linear layers whose module names the glob matches (the last "
        "match wins), e.g. '*.o_proj=8'; 'lm_head=8' quantizes the head too (not when tied to the embeddings)"))
    validation_rtol: float = Field(1e-4, gt=0, description="Largest kernel-vs-reference relative error accepted")
    lm_eval_tasks: list[str] = Field([], description=(
        "lm-evaluation-harness tasks to run on the shipped quantized model and on the full-precision checkpoint, side "
        "by side (an optional last stage, tasks/measure/harness.py): lm-eval's own (their datasets must be in the "
        "datasets cache offline), the zoo's expertbits_supersense and expertbits_ppl_<text>, or an include path's; "
        "default: none"))
    lm_eval_limit: int | None = Field(None, ge=1, description="lm-eval: at most this many examples per task (default: all)")
    lm_eval_num_fewshot: int | None = Field(None, ge=0, description="lm-eval: examples in each prompt (default: each task's own)")
    lm_eval_batch_size: int = Field(8, ge=1, description="lm-eval: requests per forward pass")
    lm_eval_include_path: str | None = Field(None, description=(
        "lm-eval: a folder of the user's own task YAMLs (on the machine the flow runs on), e.g. over local JSON files"))
    event_id: str | None = Field(None, description=(
        "The Prefect event that started this run (set by the requantize trigger; recorded in the manifest)"))

    @model_validator(mode="after")
    def _budget_fits(self):
        # an 'auto' quantizer is chosen with the checkpoint (for_checkpoint); until then the options
        # are checked as GPTQ's, the choice for every decoder-only model
        probe = self if self.quantizer != "auto" else self.model_copy(update={"quantizer": "gptq"})
        probe._resolve_defaults()
        probe.allocation_config()  # fail before any work: unknown allocator, unreachable budget, bad scheme
        probe.quantizer_config()
        self.harness_config()  # task names well formed (whether lm-eval knows them, the stage checks first)
        if self.allocator in NEEDS_GPTQ and self.quantizer == "rtn":
            raise ValueError(f"allocator {self.allocator!r} reads the error GPTQ's calibration pass measures; give "
                             "--quantizer gptq, or use routed-error with rtn")
        if self.dense_widths().active and self.quantizer == "rtn":
            raise ValueError("--dense-bits and --dense-override quantize the dense layers with GPTQ; give --quantizer "
                             "gptq (or auto), or drop them for an RTN run")
        if self.symmetric and (1 in self.bit_widths or 1 in {b for _, b in self.dense_widths().overrides}
                               or self.dense_bits == 1):
            raise ValueError("symmetric quantization cannot use 1 bit (its codes are -scale and 0, every weight "
                             "rounds to 0); drop 1 from --bit-widths or quantize asymmetrically")
        return self

    AUTO: ClassVar[tuple[str, ...]] = ("quantizer", "allocator", "budget_scope", "rotate")  # chosen for the checkpoint

    @classmethod
    def form(cls, **values) -> dict:
        """The parameters as a deployment's form shows them: validated, with the choices made by the
        quantizer left as 'auto' unless given (so switching the form's quantizer to rtn works)."""
        dumped = cls(**values).model_dump(mode="json")
        return {**dumped, **{k: cls.model_fields[k].default for k in cls.AUTO if k not in values}}

    def for_checkpoint(self, encoder_decoder: bool) -> "QuantizeParams":
        """These parameters with the quantizer chosen for the checkpoint ('auto': GPTQ, or RTN for an
        encoder-decoder model), and with it every choice left to the quantizer: what the run records."""
        if self.quantizer != "auto":
            return self
        values = self.model_dump()
        if encoder_decoder and self.dense_widths().active:
            raise ExpertbitsError("--dense-bits quantizes the dense layers with GPTQ, which does not support this "
                                  "encoder-decoder model", "drop --dense-bits and --dense-override", "dense_bits")
        if encoder_decoder and values["allocator"] in NEEDS_GPTQ:
            raise ExpertbitsError(f"allocator {values['allocator']!r} reads GPTQ's error, and GPTQ does not support "
                                  "this encoder-decoder model", "give --allocator routed-error (or auto)", "allocator")
        return QuantizeParams(**dict(values, quantizer="rtn" if encoder_decoder else "gptq"))

    def _resolve_defaults(self) -> None:
        """'auto' and unset choices become the best measured for the quantizer, so the manifest, the
        keys and the UI record what ran (docs/results/2026-12-07-quality-levers.md)."""
        if self.quantizer == "auto":
            return  # chosen with the checkpoint (for_checkpoint)
        gptq = self.quantizer == "gptq"
        if self.allocator == "auto":
            self.allocator = "output-error" if gptq else "routed-error"
        if self.budget_scope == "auto":  # one width per layer is model-wide already
            self.budget_scope = "model" if self.allocator in NEEDS_GPTQ and self.granularity == "expert" else "layer"
        if self.rotate is None:
            self.rotate = gptq

    def quantizer_config(self) -> QuantizerConfig:
        return QuantizerConfig(method=self.quantizer, symmetric=self.symmetric, clip=self.clip, damp=self.gptq_damp,
                               act_order=self.gptq_act_order, min_tokens=self.gptq_min_tokens, weighted=self.gptq_weighted,
                               rotate=self.rotate)

    def dense_widths(self) -> DenseWidths:
        return DenseWidths.parse(self.dense_bits, self.dense_override)

    def dense_config(self) -> dict | None:
        """The dense layers' widths for the quantization stage, or None: only the routed experts (the
        stage's key and files are then what they were before the option existed)."""
        widths = self.dense_widths()
        return widths.as_dict() if widths.active else None

    def harness_config(self) -> HarnessConfig | None:
        """The lm-eval stage's configuration, or None: no --lm-eval-tasks, no stage."""
        if not self.lm_eval_tasks:
            return None
        return HarnessConfig(tasks=tuple(self.lm_eval_tasks), limit=self.lm_eval_limit,
                             num_fewshot=self.lm_eval_num_fewshot, batch_size=self.lm_eval_batch_size,
                             include_path=self.lm_eval_include_path)

    def error_quantizer(self) -> QuantizerConfig:
        """Whose errors the calibration stage measures: the run's quantizer for the allocators that
        read errors; for those that only read routing, the data-free one (GPTQ at every width would
        cost minutes for numbers nobody reads; the table says which quantizer it holds)."""
        if self.allocator in NEEDS_ERROR:
            return self.quantizer_config()
        return self.quantizer_config().data_free

    def allocation_config(self) -> AllocationConfig:
        return check(AllocationConfig(avg_bits=self.avg_bits, bit_widths=tuple(self.bit_widths), zeta=self.zeta,
                                allocator=self.allocator, scheme=self.scheme,
                                maxvar_definition=self.maxvar_definition, seed=self.seed, granularity=self.granularity,
                                scope=self.budget_scope))


class LeagueParams(CommonParams):
    """Evaluate allocators × budgets × bit-width sets side by side on one checkpoint pair."""

    allocators: list[str] = Field(list(DEFAULT_ALLOCATORS), min_length=1, description="Allocators to compare")
    budgets: list[float] = Field([2.0, 2.25, 2.5, 2.75, 3.0], min_length=1, description="Average bits per expert to try")
    bit_sets: list[list[int]] = Field([[2, 3, 4], [1, 2, 3]], min_length=1, description="Bit-width sets to try")
    scheme: str = Field("three-tier", description="Tier counts for three equally spaced widths (others use two-tier)")
    random_draws: int = Field(5, ge=1, description="Draws of the random allocator (reported as median and range)")
    granularities: list[str] = Field(["expert", "layer"], min_length=1, description=(
        "Allocation granularities to compare: 'expert' (per-expert widths) and 'layer' (one width per MoE layer, "
        "what vLLM serves; cost-based allocators and uniform only)"))
    symmetric: list[bool] = Field([False, True], min_length=1, description=(
        "Quantizers to compare: asymmetric (false, zero points) and symmetric (true, what plain transformers loads; "
        "cost-based allocators and uniform only)"))
    quantizers: list[str] = Field(["rtn"], min_length=1, description=(
        f"Quantizers to compare ({', '.join(METHODS)}): rtn runs every variant; gptq (routed, sequential GPTQ on "
        "the calibration text) runs every allocator with per-expert widths and zero points"))
    task: str | None = Field(None, description=(
        f"Task accuracy to measure per cell and rank by: {', '.join(TASKS)} (an lm-evaluation-harness task, e.g. "
        "lm-eval:expertbits_supersense or lm-eval:arc_easy with its dataset cached), or empty"))
    task_examples: int = Field(300, ge=1, description="Task examples per cell")

    @field_validator("task", mode="before")
    @classmethod
    def _empty_task_is_none(cls, v):
        return v or None

    @model_validator(mode="after")
    def _grid_is_valid(self):
        for g in self.granularities:
            if g not in GRANULARITIES:
                raise ValueError(f"unknown granularity {g!r}; choose from {', '.join(GRANULARITIES)}")
        self.grid().cells()  # every cell's allocation config is validated before any work
        if self.task is not None and self.task != TASKS[0] and not (
                self.task.startswith(LM_EVAL) and self.task[len(LM_EVAL):]):
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        return self

    def grid(self) -> Grid:
        return Grid(allocators=tuple(self.allocators), budgets=tuple(self.budgets),
                    bit_sets=tuple(tuple(s) for s in self.bit_sets), scheme=self.scheme,
                    random_draws=self.random_draws, zeta=self.zeta, maxvar_definition=self.maxvar_definition,
                    group_size=self.group_size, granularities=tuple(dict.fromkeys(self.granularities)),
                    symmetric=tuple(dict.fromkeys(self.symmetric)), quantizers=tuple(dict.fromkeys(self.quantizers)),
                    clip=self.clip, **({"rotate": True} if self.rotate else {}), **self._gptq_options())

    def _gptq_options(self) -> dict:
        """GPTQ's options, only when the grid has GPTQ cells (they must not touch an RTN league's keys)."""
        if "gptq" not in self.quantizers:
            return {}
        return dict(gptq_damp=self.gptq_damp, gptq_act_order=self.gptq_act_order, gptq_min_tokens=self.gptq_min_tokens,
                    gptq_weighted=self.gptq_weighted)

    def widths(self, symmetric: bool = False) -> list[int]:
        """Every width of the grid's bit sets (symmetric: without 1 bit, which it cannot quantize)."""
        return sorted({b for s in self.bit_sets for b in s if b > 1 or not symmetric})


def _absolute(prefix: str) -> str:
    if "://" in prefix and not prefix.startswith("file://"):
        return prefix
    return ("file://" if prefix.startswith("file://") else "") + str(Path(prefix.removeprefix("file://")).expanduser().resolve())


class WatchParams(BaseModel):
    """Watch prefixes for new or changed checkpoints and requantize each one."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("default", pattern=r"^[a-z0-9][a-z0-9-]{0,40}$", description="Name of this watch (in events)")
    prefixes: list[str] = Field(min_length=1, description=(
        "Where checkpoints land: folders, file:// or s3:// prefixes (each folder holding a config.json is a "
        "checkpoint) or hf://org/name (its current revision)"))
    store: str = Field("expertbits-store", description="Artifact store of the triggered runs")
    storage_options: dict[str, Any] = Field(default_factory=dict, description=(
        "Non-secret fsspec/s3fs options (e.g. endpoint_url) for the prefixes and the store; credentials come from "
        "the worker's environment"))
    quantize: dict[str, Any] = Field(default_factory=dict, description=(
        "QuantizeParams for each triggered run (reference, avg_bits, allocator, ...); checkpoint, store and "
        "storage_options come from the event and this watch"))
    references: dict[str, str] = Field(default_factory=dict, description=(
        "The reference of the checkpoints under each prefix, e.g. {\"s3://models/incoming/mixtral\": "
        "\"hf://mistralai/Mixtral-8x7B-v0.1\"}: the longest prefix a checkpoint lies under names its reference. A "
        "checkpoint under none uses quantize.reference if set, else the base model it declares, else none (never "
        "failed for want of one)"))

    @field_validator("storage_options")
    @classmethod
    def _no_secrets(cls, v):
        return refuse_secrets(v)

    @field_validator("prefixes")
    @classmethod
    def _absolute(cls, v):
        """Local prefixes as absolute paths: the URIs the watcher finds are absolute."""
        return [_absolute(p) for p in v]

    @field_validator("references")
    @classmethod
    def _absolute_keys(cls, v):
        """Local prefixes and references as absolute paths: runs may start in another folder."""
        return {_absolute(p): _absolute(ref) if ref.strip().lower() != "none" else ref for p, ref in v.items()}

    @model_validator(mode="after")
    def _quantize_fits(self):
        from expertbits.tasks.checkpoints.watch import under

        from expertbits.tasks.errors import ExpertbitsError

        store = self.store if "://" in self.store else str(Path(self.store).expanduser().resolve())
        if under(store, self.prefixes):
            raise ExpertbitsError(f"the store {self.store} lies inside a watched prefix: every run would be announced "
                                  "as a new checkpoint and requantized again", "put the store outside the prefixes", "store")
        inside = [p for p in self.prefixes if under(p, [store])]
        if inside:
            raise ExpertbitsError(f"watched prefixes {inside} lie inside the store {self.store}: runs being published "
                                  "there would be announced as checkpoints", "watch a prefix outside the store", "prefixes")
        unwatched = [p for p in self.references if not under(p.rstrip("/"), self.prefixes)]
        if unwatched:
            raise ExpertbitsError(f"references name prefixes {unwatched} outside the watched prefixes {self.prefixes}",
                                  "map prefixes inside a watched one (or watch them too)", "references")
        reserved = {"checkpoint", "store", "storage_options", "event_id"} & set(self.quantize)
        if reserved:
            raise ExpertbitsError(f"quantize must not set {sorted(reserved)}: they come from the event and the watch",
                                  "leave them out", "quantize")
        self.quantize_params("zoo://mixtral-tiny/wordnet")  # every field valid before any run
        return self

    def reference_for(self, checkpoint: str) -> str | None:
        """The reference `references` maps the checkpoint's prefix to (the longest that holds it), if any."""
        from expertbits.tasks.checkpoints.watch import under

        holding = [p for p in self.references if under(checkpoint, [p])]
        return self.references[max(holding, key=len)] if holding else None

    def quantize_params(self, checkpoint: str, event_id: str | None = None) -> QuantizeParams:
        mapped = self.reference_for(checkpoint)
        return QuantizeParams(**dict(self.quantize, **({"reference": mapped} if mapped else {})), checkpoint=checkpoint,
                              store=self.store, storage_options=self.storage_options, event_id=event_id)
