"""Load an expertbits checkpoint as a normal transformers model whose experts run packed.

    import expertbits.tasks.model.load                       # registers the format with transformers
    model = AutoModelForCausalLM.from_pretrained(path)   # or AutoModelForSeq2SeqLM for Switch
    # or, equivalently:  model, tokenizer = expertbits.tasks.model.load.load(path)

How it fits into transformers (5.x):

* `config.json` carries `model_type` = `MODEL_TYPE`, a marker transformers does not know, so a
  plain transformers refuses the folder with that text in its error, instead of skipping the
  unknown quantization method and building random experts. The real model type is kept in
  `quantization_config.base_model_type`; importing this module registers the marker with
  `AutoConfig` and resolves it to the real config class.
* `quant_method: "expertbits"` is registered as a transformers quantizer. Before weights are
  loaded it replaces each MoE layer's experts (on the meta device, never allocated in fp) by
  `PackedExperts` / `PackedLinear` modules filled from the packed shards; transformers then
  loads every other tensor (attention, norms, routers, shared experts, embeddings) as usual.
* Anything the quantization config lists that the model does not have, and any expert module
  left unreplaced, is an error: never a model with random experts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from expertbits.kernels.modules import PackedExperts, PackedLinear
from expertbits.kernels.packing import QuantizedTensor, packed_width

from ..errors import CheckpointError
from ..store.verify import check_folder
from .install import install, install_dense
from .packed_folder import (MODEL_TYPE, PACKED_SUFFIXES, QUANT_METHOD, SIGNS_KEY, check_version, iter_quantized,
                            stored_keys)


__all__ = ["base_config_dict", "install_packed_experts", "load", "read_packed"]

def base_config_dict(config: dict) -> dict:
    """The original model's config.json from an expertbits config.json."""
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD or "base_model_type" not in qc:
        raise CheckpointError("config.json is not an expertbits-quantized config (or one from before format version 2)",
                              "quantize the model with this expertbits")
    check_version(qc, "config.json")
    return dict(config, model_type=qc["base_model_type"])


def read_packed(folder: Path, qc: dict, device: str | torch.device = "cpu") -> dict[str, QuantizedTensor]:
    """Every packed matrix of the checkpoint by module name (routed experts and dense layers), read
    from its shard; on the meta device only shapes are derived (no bytes are read)."""
    if str(device) == "meta":
        out = {}
        for name, info in {**qc["modules"], **qc.get("dense_modules", {})}.items():
            n, k = info["shape"]
            groups = -(-k // qc["group_size"])
            signs = torch.empty(k, dtype=torch.int8, device="meta") if len(stored_keys(name, info)) > 3 else None
            out[name] = QuantizedTensor(torch.empty(n, packed_width(k, info["bits"]), dtype=torch.int32, device="meta"),
                                        torch.empty(n, groups, dtype=torch.float16, device="meta"),
                                        torch.empty(n, groups, dtype=torch.uint8, device="meta"),
                                        bits=info["bits"], group_size=qc["group_size"], shape=(n, k), signs=signs)
        return out
    return {name: q for dense in (False, True) for name, _, q in iter_quantized(folder, device, dense=dense)}


def install_packed_experts(model: torch.nn.Module, qc: dict, packed: dict[str, QuantizedTensor], folder: Path) -> int:
    """Replace every MoE layer's experts (or the packed modules a previous call installed) by packed
    modules holding `packed`, and every packed dense layer too; returns the number of matrices
    installed. A fused layer's matrices are removed from `packed` as they are stacked into its banks
    (so memory holds each once)."""
    total = len(packed)
    installed = install(model, qc, folder,
                        fused=lambda names, act: PackedExperts([tuple(packed.pop(n) for n in trio) for trio in names], act),
                        linear=lambda name: PackedLinear(packed[name]), installed=(PackedExperts, PackedLinear))
    installed += install_dense(model, qc, folder, lambda name, bias: PackedLinear(packed[name], bias),
                               installed=(PackedLinear,))
    if installed != total:
        raise CheckpointError(f"{folder}: installed {installed} of {total} packed matrices",
                              "the quantization config does not match the model; quantize again")
    return installed


def _register() -> None:
    """Make transformers understand `MODEL_TYPE` configs and the `expertbits` quant method (idempotent)."""
    from transformers import AutoConfig, PreTrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        return

    class ExpertbitsModelConfig(PreTrainedConfig):
        """Resolves an expertbits config.json to the real architecture's config class."""

        model_type = MODEL_TYPE

        @classmethod
        def from_dict(cls, config_dict, **kwargs):
            base = base_config_dict(config_dict)
            return CONFIG_MAPPING[base["model_type"]].from_dict(base, **kwargs)

    @register_quantization_config(QUANT_METHOD)
    class ExpertbitsQuantizationConfig(QuantizationConfigMixin):
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)
            self.quant_method = QUANT_METHOD

    @register_quantizer(QUANT_METHOD)
    class ExpertbitsHfQuantizer(HfQuantizer):
        requires_calibration = True  # only pre-quantized folders; expertbits quantizes in its own flow

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            if not checkpoint_files:
                raise CheckpointError("transformers gave the expertbits quantizer no checkpoint files",
                                      "load a local expertbits folder (from_pretrained(path))")
            self.folder = Path(checkpoint_files[0]).parent
            check_folder(self.folder)  # a run's files are loaded only as its manifest lists them
            # shapes only: transformers replaces non-persistent buffers with empty ones while it
            # loads the rest, so the packed bytes are read once, afterwards
            qc = self.quantization_config.to_dict()
            install_packed_experts(model, qc, read_packed(self.folder, qc, "meta"), self.folder)
            # the packed tensors are ours, already loaded: not "unexpected" weights for transformers
            model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | {
                rf"\.{s}$" for s in PACKED_SUFFIXES} | {SIGNS_KEY}
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            qc = self.quantization_config.to_dict()
            device = next(p.device for p in model.parameters())
            install_packed_experts(model, qc, read_packed(self.folder, qc, device), self.folder)
            return model

        def is_serializable(self):
            return False  # the quantized folder is written by expertbits, not save_pretrained

        @property
        def is_trainable(self):
            return False

    AutoConfig.register(MODEL_TYPE, ExpertbitsModelConfig)


_register()


def load(path: str | Path, *, dtype: torch.dtype | str = "auto", device: str | torch.device | None = None):
    """(model, tokenizer) of an expertbits folder: causal LM, or seq2seq for encoder-decoder models."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json", "point at the quantization/ folder of an expertbits run")
    base_config_dict(json.loads(config_file.read_text()))  # a clear error for a folder that is not ours
    hf_logging.disable_progress_bar()
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)  # a checkpoint is data, never code
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    model = auto.from_pretrained(path, config=config, dtype=dtype, trust_remote_code=False)
    if device is not None:
        model.to(device)
    return model.eval(), AutoTokenizer.from_pretrained(path, trust_remote_code=False)
