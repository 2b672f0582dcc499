"""vLLM runs expertbits folders: the plugin vLLM loads through its `vllm.general_plugins` entry point.

    pip install expertbits into vLLM's environment (infra/vllm_env.sh does it, see docs/serving.md), then
    LLM(model="RUN/quantization")    or the OpenAI-compatible server on RUN/quantization

with no extra flag. vLLM calls `register` in each of its processes (the front end, the engine
core, the workers) before it reads the model's config. It does two things:

* teaches transformers' AutoConfig the folder's marker `model_type` (tasks/model/load.py), which
  resolves to the real architecture's config, so vLLM builds its own model class for it
  (MixtralForCausalLM, Qwen2MoeForCausalLM, ...);
* registers the quantization method `expertbits` (vllm_method.py): the routed experts of every MoE
  layer run from the packed weights, each expert at its own width, through the same code the
  loader runs (kernels/modules.py: the fused Triton kernel on CUDA, the per-expert torch path
  elsewhere), and so do packed dense layers (--dense-bits); everything else runs as vLLM runs it.

This module imports nothing from vLLM itself, so expertbits installs and imports without it.
"""

from __future__ import annotations


def register() -> None:
    """vLLM's plugin entry point (pyproject.toml: [project.entry-points."vllm.general_plugins"])."""
    from . import load  # noqa: F401  registers the marker model type with AutoConfig
    from . import vllm_method  # noqa: F401  registers quant_method "expertbits" with vLLM
