"""The flow's parameters: one pydantic model shared by the CLI, the flow and the Prefect UI form."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from expertbits.tasks.allocate import AllocationConfig


class QuantizeParams(BaseModel):
    """Quantize a fine-tuned MoE checkpoint with per-expert bit-widths."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field("zoo://micro-mixtral/finetuned", description=(
        "The MoE checkpoint to quantize: a folder, file://, s3://bucket/prefix, hf://org/name@revision or zoo://family/variant"))
    reference: str | None = Field("zoo://micro-mixtral/base", description=(
        "The checkpoint it was fine-tuned from, for the router-norm change Λ. Empty: use the final router norm (paper's proxy)"))
    avg_bits: float = Field(2.5, gt=0, le=8, description="Average bits per routed expert, between the smallest and largest bit-width")
    bit_widths: list[int] = Field([2, 3, 4], min_length=1, description="Available expert bit-widths; the two around the budget are used")
    group_size: int = Field(64, ge=8, le=4096, description="Weights per quantization group along the input dimension")
    zeta: float = Field(3.0, gt=0, description="MaxVar promotion threshold ζ (an expert passes those with ζ·MaxVar below its own)")
    store: str = Field("expertbits-store", description="Artifact store: a local folder or s3://bucket/prefix")
    storage_options: dict[str, Any] = Field(default_factory=dict, description=(
        "fsspec/s3fs options for s3:// URIs, e.g. {\"endpoint_url\": \"http://127.0.0.1:9000\"}; keep secrets in AWS_* env vars"))
    eval_text: str = Field("zoo://text/code-heldout", description="Held-out text for KL and perplexity: a file, s3:// or zoo://text/name")
    eval_windows: int = Field(16, ge=1, description="Number of evaluation windows")
    eval_seq_len: int = Field(256, ge=8, description="Tokens per evaluation window")
    validation_rtol: float = Field(1e-4, gt=0, description="Largest kernel-vs-reference relative error accepted")
    cache_dir: str | None = Field(None, description="Local checkpoint cache (default: $EXPERTBITS_CACHE or ~/.cache/expertbits)")

    @field_validator("reference", mode="before")
    @classmethod
    def _empty_is_none(cls, v):
        return v or None

    @model_validator(mode="after")
    def _budget_fits(self):
        # fail before any work: the allocation rule needs widths on both sides of the budget
        AllocationConfig(avg_bits=self.avg_bits, bit_widths=tuple(self.bit_widths), zeta=self.zeta)
        return self
