"""Where the heavy stages compute: the device a run asks for, resolved on the machine that runs it.

    --device auto      a CUDA device when the machine has one, else the CPU (the default)
    --device cpu       the CPU
    --device cuda      the current CUDA device (on a dask-cuda worker: that worker's own GPU)
    --device cuda:N    CUDA device N

A request is resolved where the stage runs (a Dask worker resolves it on its own machine), so
`auto` on a GPU worker means its GPU even when the flow runs on a laptop. `EXPERTBITS_DEVICE`, set
in a worker's environment (a work pool's job variable), is what `auto` means there.

On the CPU every stage computes in float32, exactly as it always has. On a GPU the model runs in
its own dtype (bfloat16 or float16 as stored; float32 for a float32 checkpoint), while GPTQ's
Hessians and Cholesky factors stay in float32 (kernels/gptq.py). A stage's cache key holds the
resolved placement (`Placement.key`): `auto` and `cpu` on a CPU-only host are one placement, so
they share keys and artifacts byte for byte; two GPUs of one model compute alike and share them
too, while a CPU result is never served to a GPU run, nor the reverse.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass

from .errors import ExpertbitsError

ENV = "EXPERTBITS_DEVICE"
PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
CHOICES = "auto, cpu, cuda or cuda:N"
# the dtypes a GPU computes in, by the checkpoint's config.json `dtype` (or `torch_dtype`)
GPU_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}
MARGIN_BYTES = 2 << 30  # CUDA context, the allocator's caching and fragmentation, cuBLAS workspaces


@dataclass(frozen=True)
class Placement:
    """A resolved device: `device` as torch names it ("cpu", "cuda:0"), the compute `dtype`, and
    `name`, the hardware ("cpu" or the GPU's name, e.g. "NVIDIA H100 80GB HBM3")."""

    device: str = "cpu"
    dtype: str = "float32"
    name: str = "cpu"

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    @property
    def key(self) -> list[str]:
        """What a cache key sees: the hardware and the dtype, not the index (cuda:0 and cuda:1 of
        one model compute alike; `auto` and `cpu` on a CPU-only host are the same placement)."""
        return [self.name, self.dtype]

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> dict:
        """What a stage's summary records of where it computed (the same for `auto` and `cpu` on a
        CPU-only host; the GPU's index is left out, as in the keys)."""
        return {"device": self.name if self.is_cuda else "cpu", "dtype": self.dtype}

    def __str__(self) -> str:
        return self.device if not self.is_cuda else f"{self.device} ({self.name}, {self.dtype})"


CPU = Placement()


def check(request: str) -> str:
    """The request itself, if it is well formed (what the flow parameters accept)."""
    if not isinstance(request, str) or not PATTERN.match(request.strip()):
        raise ValueError(f"{request!r} is not a device: give {CHOICES}")
    return request.strip()


def resolve(request: str = "auto", config: dict | None = None) -> Placement:
    """The placement `request` means on this machine, for a model whose config.json is `config`
    (its dtype is the GPU's compute dtype). A device this machine does not have is an error
    naming it and what there is, never a silent fall back to the CPU."""
    request = check(request)
    if request == "auto" and os.environ.get(ENV):
        if not PATTERN.match(os.environ[ENV].strip()):
            raise ValueError(f"{ENV}={os.environ[ENV]!r} is not a device: give {CHOICES}")
        request = os.environ[ENV].strip()
    import torch

    if request == "cpu" or request == "auto" and not torch.cuda.is_available():
        return CPU
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__} was built without CUDA" if torch.version.cuda is None else \
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no CUDA device"
        raise ExpertbitsError(f"--device {request}: this machine has no CUDA device ({build})",
                              "use --device cpu (or auto, which picks the CPU here), or run on a machine with a GPU", "device")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if request in ("auto", "cuda") else int(request.split(":")[1])
    if index >= count:
        raise ExpertbitsError(f"--device {request}: this machine has {count} CUDA device{'s' if count > 1 else ''} "
                              f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})",
                              "name one of them, or use --device cuda for the current one", "device")
    return Placement(f"cuda:{index}", gpu_dtype(config), torch.cuda.get_device_name(index))


def gpu_dtype(config: dict | None) -> str:
    """The dtype a GPU computes a model in: the one it is stored in (bf16 when it does not say)."""
    stored = (config or {}).get("dtype") or (config or {}).get("torch_dtype") or "bfloat16"
    return GPU_DTYPES.get(str(stored).removeprefix("torch."), "bfloat16")


def of_checkpoint(request: str, path) -> Placement:
    """`resolve` for the checkpoint (or quantized folder) at `path`."""
    import json
    from pathlib import Path

    return resolve(request, json.loads((Path(path) / "config.json").read_text()))


def key(request: str) -> list[str]:
    """The cache-key part of a request on this machine, before any checkpoint is read: the
    hardware and, on a GPU, "model" (the dtype follows the model, whose digest the key holds)."""
    p = resolve(request)
    return p.key if not p.is_cuda else [p.name, "model-dtype"]


def require_free(placement: Placement, need: int, what: str) -> None:
    """Refuse, before it starts, work that needs `need` bytes of a GPU that has less free."""
    if not placement.is_cuda:
        return
    import torch

    free, total = torch.cuda.mem_get_info(torch.device(placement.device))
    if need > free:
        gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
        raise ExpertbitsError(f"{what} needs about {gib(need)} on {placement} and {gib(free)} of its {gib(total)} "
                              "are free", "free the GPU (other processes hold its memory), choose another one with "
                              "--device cuda:N, or run this stage with --device cpu", "device")


def synchronize(placement: Placement) -> None:
    """Wait for the device's queued work (timing a GPU without this times the launches)."""
    if placement.is_cuda:
        import torch

        torch.cuda.synchronize(torch.device(placement.device))
