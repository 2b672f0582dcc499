"""Architecture adapters: where the router and the expert matrices of each MoE layer live.

One small table per architecture names the router and the experts in both layouts that
transformers 5 writes: legacy per-expert keys (`experts.{e}.w1.weight`) and fused 3-D tensors
(`experts.gate_up_proj` [E, 2F, H], `experts.down_proj` [E, H, F]). Nothing else in expertbits
knows model names. A tensor that looks like an expert but is not claimed is an error, never a
skip: silently unquantized experts are the most reported bug in peer tools.

Roles: `gate` is the first-layer (input) projection whose rows MaxVar is taken over; `up` is
the second input projection of gated FFNs; `down` is the output projection.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from ..errors import CheckpointError
from .reader import Checkpoint


@dataclass(frozen=True)
class ExpertMatrix:
    """One [out, in] matrix of one expert, and where its bytes are in the checkpoint."""

    layer: int
    expert: int
    role: str  # "gate" | "up" | "down"
    name: str  # canonical module name, used for the quantized tensors' keys
    key: str  # source tensor
    index: int | None = None  # expert index into a fused 3-D tensor
    rows: tuple[int, int] | None = None  # row range inside the matrix (gate/up halves of gate_up_proj)


def block_of(key: str) -> str:
    """The decoder layer a tensor belongs to (`model.layers.3`, `decoder.block.1`), or "" for the
    embeddings, final norm and head."""
    m = re.match(r"(.*?\.(?:layers|block)\.\d+)\.", key)
    return m.group(1) if m else ""


DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I8": 1, "U8": 1}


def matrix_shape(ckpt: Checkpoint, m: ExpertMatrix) -> tuple[int, int]:
    """(N, K) of one expert matrix, from its tensor's header (its slice of a fused tensor)."""
    shape = ckpt.tensors[m.key].shape
    shape = shape[1:] if m.index is not None else shape
    return (m.rows[1] - m.rows[0] if m.rows else shape[0]), shape[-1]


def matrix_bytes(ckpt: Checkpoint, m: ExpertMatrix) -> int:
    """Stored bytes of one expert matrix (its slice of a fused tensor)."""
    n, k = matrix_shape(ckpt, m)
    return n * k * DTYPE_BYTES.get(ckpt.tensors[m.key].dtype, 4)


@dataclass(frozen=True)
class MoELayer:
    layer: int
    router_key: str
    num_experts: int
    matrices: tuple[ExpertMatrix, ...]
    experts_module: str  # the experts module's name in the model transformers builds (loaded naming)


@dataclass(frozen=True)
class MoEModel:
    model_type: str
    layout: str  # "per-expert" | "fused"
    layers: tuple[MoELayer, ...]
    # decoder layers (their name prefixes, e.g. "model.layers.61") stored beyond the config's
    # num_hidden_layers (DeepSeek-V3's multi-token-prediction layer): transformers never builds
    # them, so they are kept as stored, not quantized
    kept_as_stored: tuple[str, ...] = ()

    @property
    def matrices(self) -> list[ExpertMatrix]:
        return [m for layer in self.layers for m in layer.matrices]


@dataclass(frozen=True)
class _Spec:
    """Regexes for one architecture, with named groups `layer`, `expert`, `proj` (and `stack`:
    encoder/decoder blocks of seq2seq models, where decoder layer ids follow the encoder's)."""

    router: str
    per_expert: str
    roles: dict[str, str]  # projection name in the key -> role
    fused_prefix: str  # the experts module, for fused tensors: f"{prefix}.gate_up_proj" / ".down_proj"
    router_suffix: str = r"\.gate\.weight$"  # what replaces with ".experts" to name the experts module
    renames: tuple[tuple[str, str], ...] = ()  # stored -> loaded module names (transformers' load-time renames)

    def experts_module(self, router_key: str) -> str:
        name = re.sub(self.router_suffix, ".experts", router_key)
        for old, new in self.renames:
            name = name.replace(old, new)
        return name


def _layer(m: re.Match, config: dict) -> int:
    stack = m.groupdict().get("stack")
    return int(m["layer"]) + (config.get("num_layers", 0) if stack == "decoder" else 0)


_MLP = r"model\.layers\.(?P<layer>\d+)\.mlp"
_SPECS: dict[str, tuple[_Spec, ...]] = {
    "mixtral": (
        _Spec(
            router=r"model\.layers\.(?P<layer>\d+)\.block_sparse_moe\.gate\.weight",
            per_expert=r"model\.layers\.(?P<layer>\d+)\.block_sparse_moe\.experts\.(?P<expert>\d+)\.(?P<proj>w1|w2|w3)\.weight",
            roles={"w1": "gate", "w3": "up", "w2": "down"},
            fused_prefix="",
            renames=((".block_sparse_moe.", ".mlp."),),  # transformers 5 loads Mixtral's MoE block as `mlp`
        ),
        _Spec(
            router=_MLP + r"\.gate\.weight",
            per_expert=_MLP + r"\.experts\.(?P<expert>\d+)\.(?P<proj>w1|w2|w3)\.weight",
            roles={"w1": "gate", "w3": "up", "w2": "down"},
            fused_prefix=_MLP + r"\.experts",
        ),
    ),
}
_QWEN_LIKE = (
    _Spec(
        router=_MLP + r"\.gate\.weight",
        per_expert=_MLP + r"\.experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight",
        roles={"gate_proj": "gate", "up_proj": "up", "down_proj": "down"},
        fused_prefix=_MLP + r"\.experts",
    ),
)
for _t in ("qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v2"):
    _SPECS[_t] = _QWEN_LIKE
_SWITCH = r"(?P<stack>encoder|decoder)\.block\.(?P<layer>\d+)\.layer\.\d+\.mlp"
_SPECS["switch_transformers"] = (  # per-expert modules in both stacks; wi is the first (input) layer
    _Spec(router=_SWITCH + r"\.router\.classifier\.weight",
          per_expert=_SWITCH + r"\.experts\.expert_(?P<expert>\d+)\.(?P<proj>wi|wo)\.weight",
          roles={"wi": "gate", "wo": "down"}, fused_prefix="", router_suffix=r"\.router\.classifier\.weight$"),
)

SUPPORTED_MODEL_TYPES = tuple(sorted(_SPECS))


def load_renames(model_type: str) -> tuple[tuple[str, str], ...]:
    """(stored, loaded) name fragments transformers renames at load time for this model type."""
    return tuple(r for spec in _SPECS.get(model_type, ()) for r in spec.renames)
_EXPERTISH = re.compile(r"\.experts?\.|\.experts$|block_sparse_moe|\.router\.")


def detect(ckpt: Checkpoint) -> MoEModel:
    """Map every router and expert tensor of a checkpoint, or raise CheckpointError (memoised on
    the open checkpoint: per-layer work asks again for every layer)."""
    if "_moe_model" not in ckpt.__dict__:
        ckpt.__dict__["_moe_model"] = _detect(ckpt)
    return ckpt.__dict__["_moe_model"]


def _detect(ckpt: Checkpoint) -> MoEModel:
    model_type = ckpt.config.get("model_type", "?")
    names = ckpt.tensors
    if model_type not in _SPECS:
        if any(_EXPERTISH.search(k) for k in names):
            raise CheckpointError(
                f"{ckpt.path}: model_type {model_type!r} has expert tensors but no expertbits adapter",
                f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}; add an adapter in tasks/checkpoints/adapters.py",
            )
        raise _dense(ckpt, model_type)
    limit = None if ckpt.config.get("is_encoder_decoder") else ckpt.config.get("num_hidden_layers")
    for spec in _SPECS[model_type]:
        routers = {_layer(m, ckpt.config): k for k in names if (m := re.fullmatch(spec.router, k))}
        beyond = {layer: k for layer, k in routers.items() if limit is not None and layer >= limit}
        if len(beyond) < len(routers):
            blocks = {block_of(k) for k in beyond.values()}
            model = _build(ckpt, model_type, spec, {k: v for k, v in routers.items() if k not in beyond}, blocks)
            return MoEModel(model.model_type, model.layout, model.layers, tuple(sorted(blocks)))
    raise _dense(ckpt, model_type)


def _dense(ckpt: Checkpoint, model_type: str) -> CheckpointError:
    return CheckpointError(
        f"{ckpt.path}: no MoE router found (model_type {model_type!r}); this looks like a dense model",
        "expertbits allocates bits per expert, so it needs a Mixture-of-Experts checkpoint",
    )


def _refuse_fp8(ckpt: Checkpoint, keys: list[str]) -> None:
    """FP8 expert weights (DeepSeek-V3's release: float8_e4m3fn + 128×128 `weight_scale_inv`) are
    refused rather than half-handled: their non-expert tensors are FP8 too, and writing those
    back without transformers' FP8 config would load wrong."""
    fp8 = [k for k in keys if ckpt.tensors[k].dtype.startswith("F8")]
    if fp8:
        info = ckpt.tensors[fp8[0]]
        raise CheckpointError(
            f"{ckpt.path / info.file}: {len(fp8)} expert tensors are stored in FP8 ({info.dtype}, e.g. {fp8[0]}"
            f"{' with block scales' if any(k.endswith('_scale_inv') for k in ckpt.tensors) else ''}); expertbits "
            "quantizes from 16- or 32-bit weights",
            "dequantize the checkpoint to bf16 first (DeepSeek-V3's inference/fp8_cast_bf16.py does exactly that) "
            "and point expertbits at that copy")


def _build(ckpt: Checkpoint, model_type: str, spec: _Spec, routers: dict[int, str], skipped: set[str]) -> MoEModel:
    names = {k: v for k, v in ckpt.tensors.items() if block_of(k) not in skipped}
    _refuse_fp8(ckpt, [k for k in names if re.fullmatch(spec.per_expert, k) or ".experts." in k])
    per_expert: dict[int, dict[tuple[int, str], str]] = defaultdict(dict)
    for k in names:
        if m := re.fullmatch(spec.per_expert, k):
            per_expert[_layer(m, ckpt.config)][(int(m["expert"]), spec.roles[m["proj"]])] = k
    layers, claimed, layouts = [], set(routers.values()), set()
    for layer, router_key in sorted(routers.items()):
        shape = names[router_key].shape
        if len(shape) != 2:
            raise CheckpointError(f"{ckpt.path}: router {router_key} has shape {shape}, expected [experts, hidden]", "re-export the checkpoint")
        num_experts = shape[0]
        if per_expert.get(layer):
            matrices = _per_expert_layer(ckpt, layer, num_experts, per_expert[layer], spec)
            layouts.add("per-expert")
        else:
            matrices = _fused_layer(ckpt, layer, num_experts, router_key, spec)
            layouts.add("fused")
        claimed.update(m.key for m in matrices)
        layers.append(MoELayer(layer, router_key, num_experts, tuple(matrices), spec.experts_module(router_key)))
    stray = sorted(k for k in names if k not in claimed and ".experts." in k and "shared_expert" not in k)
    if stray:
        raise CheckpointError(
            f"{ckpt.path}: {len(stray)} expert tensors not understood by the {model_type} adapter, e.g. {stray[:3]}",
            "this layout is not supported yet; extend tasks/checkpoints/adapters.py rather than leave experts unquantized",
        )
    if len(layouts) != 1:
        raise CheckpointError(f"{ckpt.path}: mixes per-expert and fused expert tensors", "re-export the checkpoint in one layout")
    return MoEModel(model_type=model_type, layout=layouts.pop(), layers=tuple(layers))


def _per_expert_layer(ckpt, layer, num_experts, found, spec) -> list[ExpertMatrix]:
    out = []
    roles = [r for r in ("gate", "up", "down") if r in spec.roles.values()]
    for e in range(num_experts):
        for role in roles:
            key = found.get((e, role))
            if key is None:
                raise CheckpointError(
                    f"{ckpt.path}: layer {layer} has a router for {num_experts} experts but no {role} matrix for expert {e}",
                    "the checkpoint is incomplete; re-export it",
                )
            out.append(ExpertMatrix(layer, e, role, key.removesuffix(".weight"), key))
    extra = sorted({e for e, _ in found} - set(range(num_experts)))
    if extra:
        raise CheckpointError(f"{ckpt.path}: layer {layer} has expert tensors {extra} beyond its router's {num_experts} rows", "re-export the checkpoint")
    return out


def _fused_layer(ckpt, layer, num_experts, router_key, spec) -> list[ExpertMatrix]:
    prefix = re.sub(r"\(\?P<layer>\\d\+\)", str(layer), spec.fused_prefix).replace("\\.", ".") if spec.fused_prefix else ""
    gate_up, down = f"{prefix}.gate_up_proj", f"{prefix}.down_proj"
    if not prefix or gate_up not in ckpt.tensors or down not in ckpt.tensors:
        raise CheckpointError(
            f"{ckpt.path}: layer {layer} has a router ({router_key}) but no expert tensors the adapter recognises",
            "the checkpoint is incomplete or in an unsupported layout",
        )
    e, two_f, h = ckpt.tensors[gate_up].shape
    e2, h2, f = ckpt.tensors[down].shape
    if e != num_experts or e2 != num_experts or two_f != 2 * f or h2 != h:
        raise CheckpointError(
            f"{ckpt.path}: layer {layer} fused expert shapes {ckpt.tensors[gate_up].shape} / {ckpt.tensors[down].shape} "
            f"do not match {num_experts} experts of [2F, H] / [H, F]",
            "the checkpoint is damaged or in an unsupported layout",
        )
    out = []
    for x in range(num_experts):
        out.append(ExpertMatrix(layer, x, "gate", f"{prefix}.{x}.gate_proj", gate_up, x, (0, f)))
        out.append(ExpertMatrix(layer, x, "up", f"{prefix}.{x}.up_proj", gate_up, x, (f, 2 * f)))
        out.append(ExpertMatrix(layer, x, "down", f"{prefix}.{x}.down_proj", down, x, None))
    return out


def check_compatible(model: MoEModel, reference: MoEModel, ckpt: Checkpoint, ref: Checkpoint) -> None:
    """The reference must have the same routers with the same shapes; otherwise Λ is meaningless."""
    ours = {layer.layer: ckpt.tensors[layer.router_key].shape for layer in model.layers}
    theirs = {layer.layer: ref.tensors[layer.router_key].shape for layer in reference.layers}
    if ours != theirs:
        diff = [(k, ours.get(k), theirs.get(k)) for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
        layer, a, b = diff[0]
        raise CheckpointError(
            f"reference {ref.path} does not match checkpoint {ckpt.path}: layer {layer} router shape {b} vs {a} "
            f"({len(diff)} layers differ)",
            "pass the checkpoint this model was fine-tuned from as --reference, or omit --reference to use the final router norm",
        )
