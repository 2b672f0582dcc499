"""The `expertbits` quantization method for vLLM (imported by vllm_plugin.register, in vLLM's environment).

How an expertbits folder meets vLLM's model classes (vLLM 0.32):

* vLLM builds each MoE layer's routed experts as a `RoutedExperts` layer and asks
  `ExpertbitsConfig.get_quant_method` for its method: `ExpertbitsMoE` here. A linear layer whose
  parts the folder packs (--dense-bits: vLLM fuses q/k/v into qkv_proj and gate/up into
  gate_up_proj, `packed_modules_mapping`) gets `ExpertbitsLinear`; every other one runs as stored.
* Loading: vLLM's own expert mapping routes a checkpoint tensor named
  `<experts prefix>.<e>.<w1|w2|w3 or gate_proj|down_proj|up_proj>.<suffix>` to the layer's
  parameter `w13_<suffix>` / `w2_<suffix>` with (expert, shard). `checkpoint_weight_mapper` renames
  each packed tensor of `quantization_config.modules` (and each rotation's sign tensor) to that
  form, so vLLM's loader hands every one to `ExpertbitsMoE`'s placeholders, whose `weight_loader`
  keeps it per (expert, shard, suffix): the experts of one layer have different widths, so their
  codes cannot share one stacked tensor. Packed dense layers keep their names, which vLLM's own
  stacking maps to its fused layers' shards. A sign tensor goes to the first matrix that reads it
  and is shared from there by name (`sign_values`).
* `process_weights_after_loading` checks that every matrix arrived with the shapes its entry
  says, and builds the layer's `PackedExperts` (kernels/modules.py): one ExpertBank per role.
* `apply` gets the router's top-k experts and weights (vLLM routes; shared experts run beside) and
  runs `PackedExperts`: on CUDA the fused Triton kernel's two launches, elsewhere the per-expert
  torch path, each expert at its own width: the computation `expertbits.load` runs.

Before any of it, `maybe_update_config` checks the folder against its run's manifest, with the
loader's error (tasks/store/verify.py), and the config's format version.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.utils import set_weight_attrs

from expertbits.kernels.modules import PackedExperts, packed_linear
from expertbits.kernels.packing import QuantizedTensor, packed_width

from ..checkpoints.adapters import block_of
from ..errors import CheckpointError
from ..store.verify import check_folder
from .packed_folder import PACKED_SUFFIXES, QUANT_METHOD, check_version

ROLES = ("gate", "up", "down")
SHARD = {"gate": "w1", "up": "w3", "down": "w2"}  # vLLM's expert shards: w13 = [gate; up], w2 = down
PARAM = {"w1": "w13", "w3": "w13", "w2": "w2"}
DTYPES = {"qweight": torch.int32, "scales": torch.float16, "zeros": torch.uint8, "signs": torch.int8}
ACTIVATIONS = {MoEActivation.SILU: nn.functional.silu, MoEActivation.GELU: nn.functional.gelu,
               MoEActivation.GELU_TANH: lambda x: nn.functional.gelu(x, approximate="tanh")}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# every tensor the mapper may rename: packed parts and sign tensors (names are matched whole)
_OURS = re.compile(r"^.*(?:\.(?:qweight|scales|zeros)|\.expertbits_signs_\d+)$")


def check(qc: dict, where: str) -> None:
    """What this method serves, or a CheckpointError naming the fix."""
    check_version(qc, where)
    outside = [name for name in qc.get("dense_modules", {}) if not block_of(name + ".")]
    if outside:
        raise CheckpointError(f"{where}: the folder packs {outside[0]}, outside the decoder layers; the vLLM plugin "
                              "serves packed dense layers inside them (vLLM's head is no linear layer a quantization "
                              "method can take)", f"quantize without the override that names {outside[0]}")
    if qc.get("layout") == "per-expert" and qc.get("base_model_type") == "switch_transformers":
        raise CheckpointError(f"{where}: Switch Transformers is an encoder-decoder model vLLM does not run",
                              "run it with expertbits.load (AutoModelForSeq2SeqLM)")


@register_quantization_config(QUANT_METHOD)
class ExpertbitsConfig(QuantizationConfig):
    """quant_method "expertbits": the folder's quantization_config, as config.json holds it."""

    def __init__(self, qc: dict[str, Any]):
        super().__init__()
        check(qc, "config.json")
        self.qc, self.group_size = qc, int(qc["group_size"])
        self.by_layer: dict[int, dict[int, dict[str, tuple[str, dict]]]] = {}  # layer -> expert -> role -> entry
        for name, info in qc["modules"].items():
            self.by_layer.setdefault(int(info["layer"]), {}).setdefault(int(info["expert"]), {})[info["role"]] = (name, info)
        self.dense: dict[str, dict] = qc.get("dense_modules", {})
        # filled while vLLM builds the model: MoE layer -> (vLLM's experts prefix, role -> its checkpoint name)
        self.experts_at: dict[int, tuple[str, dict[str, str]]] = {}
        self.slot_signs: dict[tuple[int, int, str], str] = {}  # (layer, expert, shard) -> the sign tensor loaded there
        # every rotation's signs by tensor name, from whichever layer vLLM handed them to: a sign tensor
        # is shared by the matrices of a decoder layer that read one width (experts and dense layers);
        # vLLM processes layers only once every weight is loaded
        self.sign_values: dict[str, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"ExpertbitsConfig(group_size={self.group_size}, matrices={len(self.qc['modules'])})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # Triton's kernels run on every CUDA GPU vLLM supports; elsewhere the torch path

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the config is config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ExpertbitsConfig":
        return cls(config)

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        check_folder(model_name)  # a published run's folder is served only as its manifest lists it

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, RoutedExperts):
            m = _LAYER.search(prefix)
            if m is None or int(m.group(1)) not in self.by_layer:
                raise CheckpointError(f"vLLM's MoE layer {prefix} has no packed experts in config.json",
                                      "the folder does not match the model; quantize again")
            idx = int(m.group(1))
            self.experts_at[idx] = (prefix, {"gate": layer.ckpt_gate_proj_name, "up": layer.ckpt_up_proj_name,
                                             "down": layer.ckpt_down_proj_name})
            return ExpertbitsMoE(layer.moe_config, self, idx)
        if isinstance(layer, LinearBase):
            parent, _, last = prefix.rpartition(".")
            parts = [f"{parent}.{p}" if parent else p for p in self.packed_modules_mapping.get(last, [last])]
            packed = [p for p in parts if p in self.dense]
            if not packed:
                return UnquantizedLinearMethod()
            if len(packed) != len(parts):
                raise CheckpointError(f"vLLM computes {parts} as one layer ({prefix}), and the folder packs only "
                                      f"{packed}", "give them one width: a --dense-override that matches all of them")
            return ExpertbitsLinear(self, parts)
        return None

    def get_checkpoint_weight_mapper(self):  # an instance method here: the table is this folder's
        """Each packed tensor's name -> `<vLLM experts prefix>.<e>.<vLLM's checkpoint name of its
        role>.<suffix>`; each sign tensor -> the `signs` slot of the first matrix that reads it.
        vLLM applies the mapper at more than one level, so renaming a renamed name is a no-op."""
        from vllm.model_executor.models.utils import WeightsMapper

        table: dict[str, str] = {}
        for idx, (prefix, ckpt) in self.experts_at.items():
            for e, roles in sorted(self.by_layer[idx].items()):
                for role, (name, info) in roles.items():
                    target = f"{prefix}.{e}.{ckpt[role]}"
                    table.update({f"{name}.{s}": f"{target}.{s}" for s in PACKED_SUFFIXES})
                    if info.get("rotation") and info["signs"] not in table:
                        table[info["signs"]] = f"{target}.signs"
                        self.slot_signs[idx, e, SHARD[role]] = info["signs"]
        for name, info in self.dense.items():  # their own names reach vLLM's linear layers as they are
            if info.get("rotation") and info["signs"] not in table:
                table[info["signs"]] = f"{name}.signs"
        return QuantizationConfig.get_checkpoint_weight_mapper() | WeightsMapper(
            orig_to_new_regex={_OURS: lambda m: table.get(m.group(0), m.group(0))})


class ExpertbitsMoE(FusedMoEMethodBase):
    """One MoE layer's routed experts from their packed weights, each at its own width."""

    def __init__(self, moe, config: ExpertbitsConfig, layer: int):
        super().__init__(moe)
        self.config, self.layer = config, layer
        if moe.activation not in ACTIVATIONS:
            raise CheckpointError(f"MoE layer {layer}: vLLM's activation {moe.activation} has no expertbits path",
                                  f"expertbits serves experts with {', '.join(a.value for a in ACTIVATIONS)}")
        if getattr(moe, "tp_size", 1) > 1 or getattr(moe, "ep_size", 1) > 1:
            raise CheckpointError(f"MoE layer {layer}: tensor or expert parallelism splits the experts, which the "
                                  "packed layout does not support yet", "serve with --tensor-parallel-size 1")
        self.act = ACTIVATIONS[moe.activation]

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                       **extra_weight_attrs):
        if num_experts != len(self.config.by_layer[self.layer]):
            raise CheckpointError(f"MoE layer {self.layer}: vLLM builds {num_experts} experts, config.json packs "
                                  f"{len(self.config.by_layer[self.layer])}", "the folder does not match the model")
        layer.expertbits_parts = {}

        def loader(suffix: str):
            def weight_loader(param, loaded_weight, weight_name=None, shard_id=None, expert_id=None,
                              return_success=False, **_):
                if shard_id is None or expert_id is None:
                    raise CheckpointError(f"{weight_name} reached MoE layer {self.layer} without its expert",
                                          "this is a bug; please report it")
                t = loaded_weight.detach().clone()
                if suffix == "signs":
                    self.config.sign_values[self.config.slot_signs[self.layer, int(expert_id), shard_id]] = t
                else:
                    layer.expertbits_parts[int(expert_id), shard_id, suffix] = t
                return True if return_success else None
            return weight_loader

        # placeholders with no elements (vLLM's check for weights never loaded skips those): the
        # parts of experts of different widths are kept per expert, and checked when all are in
        for param in ("w13", "w2"):
            for suffix, dtype in DTYPES.items():
                p = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
                set_weight_attrs(p, {"weight_loader": loader(suffix)})
                layer.register_parameter(f"{param}_{suffix}", p)

    def process_weights_after_loading(self, layer) -> None:
        cfg, parts = self.config, layer.expertbits_parts
        device = layer.w13_qweight.device
        hidden, ffn = layer.hidden_size, layer.intermediate_size_per_partition
        expected = {"gate": (ffn, hidden), "up": (ffn, hidden), "down": (hidden, ffn)}
        experts = []
        for e in range(len(cfg.by_layer[self.layer])):
            matrices = []
            for role in ROLES:
                name, info = cfg.by_layer[self.layer][e][role]
                n, k = info["shape"]
                if (n, k) != expected[role]:
                    raise CheckpointError(f"{name}: shape {[n, k]} in config.json, vLLM's {role} is {list(expected[role])}",
                                          "the folder does not match the model; quantize again")
                stored = [parts.pop((e, SHARD[role], s), None) for s in PACKED_SUFFIXES]
                signs = None
                if info.get("rotation"):
                    signs = cfg.sign_values.get(info["signs"])
                    stored.append(signs)
                if any(t is None for t in stored):
                    raise CheckpointError(f"the quantized checkpoint lists {name} but not all of its tensors were "
                                          "loaded", "the quantized checkpoint is incomplete or was edited; quantize again")
                groups = -(-k // cfg.group_size)
                if tuple(stored[0].shape) != (n, packed_width(k, info["bits"])) or tuple(stored[1].shape) != (n, groups):
                    raise CheckpointError(f"{name}: stored shapes {[tuple(t.shape) for t in stored[:3]]} do not match "
                                          f"its config entry ({info['bits']} bits, {[n, k]})",
                                          "the quantized checkpoint was edited; quantize again")
                matrices.append(QuantizedTensor(*(t.to(device) for t in stored[:3]), bits=int(info["bits"]),
                                                group_size=cfg.group_size, shape=(n, k),
                                                signs=None if signs is None else signs.to(device)))
            experts.append(tuple(matrices))
        layer.expertbits_parts = {}
        layer.expertbits_experts = PackedExperts(experts, self.act).to(device)

    def get_fused_moe_quant_config(self, layer):
        return FUSED_MOE_UNQUANTIZED_CONFIG  # nothing for vLLM's kernels: apply runs expertbits' own

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
        if layer.apply_router_weight_on_input:
            raise CheckpointError("this model applies the routing weight to the experts' input, which the packed "
                                  "experts do not", "serve it unquantized, or report the architecture")
        return layer.expertbits_experts(x, topk_ids.long(), topk_weights.to(x.dtype))


class ExpertbitsLinear(LinearMethodBase):
    """Dense linear layers packed by --dense-bits: vLLM's layer (one of q/k/v, or their fused
    qkv_proj, gate_up_proj...) computed as each packed part's x Wᵀ, concatenated, plus the bias."""

    SHARDS = {"q": 0, "k": 1, "v": 2}  # QKVParallelLinear's shard ids; merged layers number theirs

    def __init__(self, config: ExpertbitsConfig, names: list[str]):
        self.config, self.names = config, names

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        if input_size_per_partition != input_size or sum(output_partition_sizes) != output_size:
            raise CheckpointError(f"{self.names}: tensor parallelism splits the dense layers, which the packed layout "
                                  "does not support yet", "serve with --tensor-parallel-size 1")
        layer.expertbits_parts = {}
        expected = [(n, input_size) for n in output_partition_sizes]
        shapes = [tuple(self.config.dense[name]["shape"]) for name in self.names]
        if shapes != expected:
            raise CheckpointError(f"{self.names}: shapes {shapes} in config.json, vLLM's layer has {expected}",
                                  "the folder does not match the model; quantize again")

        def loader(suffix: str):
            def weight_loader(param, loaded_weight, loaded_shard_id=None, *_, **__):
                index = self.SHARDS.get(loaded_shard_id, loaded_shard_id) if loaded_shard_id is not None else 0
                t = loaded_weight.detach().clone()
                if suffix == "signs":
                    self.config.sign_values[self.config.dense[self.names[index]]["signs"]] = t
                else:
                    layer.expertbits_parts[int(index), suffix] = t
            return weight_loader

        for suffix, dtype in DTYPES.items():
            p = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
            set_weight_attrs(p, {"weight_loader": loader(suffix)})
            layer.register_parameter(suffix, p)

    def process_weights_after_loading(self, layer) -> None:
        cfg, parts, device = self.config, layer.expertbits_parts, layer.qweight.device
        packed = []
        for i, name in enumerate(self.names):
            info = cfg.dense[name]
            stored = [parts.pop((i, s), None) for s in PACKED_SUFFIXES]
            signs = cfg.sign_values.get(info["signs"]) if info.get("rotation") else None
            if any(t is None for t in stored) or (info.get("rotation") and signs is None):
                raise CheckpointError(f"the quantized checkpoint lists {name} but not all of its tensors were loaded",
                                      "the quantized checkpoint is incomplete or was edited; quantize again")
            n, k = info["shape"]
            packed.append(QuantizedTensor(*(t.to(device) for t in stored), bits=int(info["bits"]),
                                          group_size=cfg.group_size, shape=(n, k),
                                          signs=None if signs is None else signs.to(device)))
        layer.expertbits_parts = {}
        layer.expertbits_packed = packed

    def apply(self, layer, x, bias=None):
        y = torch.cat([packed_linear(x, q) for q in layer.expertbits_packed], dim=-1)
        return y if bias is None else y + bias.to(y.dtype)
