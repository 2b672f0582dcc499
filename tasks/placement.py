"""Where the heavy stages compute: the device a run asks for, resolved on the machine that runs it.

    --device auto      a CUDA device when the machine has one, else the CPU (the default)
    --device cpu       the CPU
    --device cuda      the current CUDA device (on a dask-cuda worker: that worker's own GPU)
    --device cuda:N    CUDA device N

The flow resolves `auto` once, on the machine its process runs on (the routing and evaluation
stages run there too), into `cpu`, `cuda` or `cuda:N`, and passes that to every stage; a Dask
worker then takes `cuda` as its own current GPU (one per worker with `--dask local-cuda`).
`EXPERTBITS_DEVICE`, set in the flow run's environment (a work pool's job variable), is what
`auto` means there.

On the CPU every stage computes in float32, exactly as it always has. On a GPU the model runs in
its own dtype (bfloat16 or float16 as stored; float32 for a float32 checkpoint), while GPTQ's
Hessians and Cholesky factors stay in float32 (kernels/gptq.py). A stage's cache key holds the
resolved device's kind and dtype (`key`), from the resolved name alone, so every process computes
the same key whatever hardware it has: `auto` and `cpu` on a CPU-only host are one placement, so
they share keys and artifacts byte for byte; a CPU result is never served to a GPU run, nor the
reverse (GPUs share results: the dtype follows the model, which the key's checkpoint digest fixes).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .errors import ExpertbitsError

ENV = "EXPERTBITS_DEVICE"
PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
CHOICES = "auto, cpu, cuda or cuda:N"
# the dtypes a GPU computes in, by the checkpoint's config.json `dtype` (or `torch_dtype`)
GPU_DTYPES = ("bfloat16", "float16", "float32")
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


def _effective(request: str) -> str:
    """The request, with `auto` as the environment pins it (`EXPERTBITS_DEVICE`), if it does."""
    request = check(request)
    pinned = os.environ.get(ENV, "").strip()
    if request != "auto" or not pinned:
        return request
    if not PATTERN.match(pinned):
        raise ValueError(f"{ENV}={os.environ[ENV]!r} is not a device: give {CHOICES}")
    return pinned


def resolve(request: str = "auto", config: dict | None = None) -> Placement:
    """The placement `request` means on this machine, for a model whose config.json is `config`
    (its dtype is the GPU's compute dtype). A device this machine does not have is an error
    naming it and what there is, never a silent fall back to the CPU."""
    request = _effective(request)
    import torch

    if request == "cpu" or request == "auto" and not torch.cuda.is_available():
        return CPU
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__} was built without CUDA" if torch.version.cuda is None else \
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no CUDA device"
        raise ExpertbitsError(f"--device {request}: this machine has no CUDA device ({build})",
                              "use --device cpu (or auto), or run on a machine with a GPU", "device")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if request in ("auto", "cuda") else int(request.split(":")[1])
    if index >= count:
        raise ExpertbitsError(f"--device {request}: this machine has {count} CUDA device{'s' if count > 1 else ''} "
                              f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})",
                              "name one of them, or use --device cuda for the current one", "device")
    return Placement(f"cuda:{index}", gpu_dtype(config), torch.cuda.get_device_name(index))


def resolved(request: str) -> str:
    """What the flow passes its stages: the request made `cpu`, `cuda` or `cuda:N` on this machine
    (`auto` resolved, the environment's pin applied), checked: a device the machine lacks is an
    error here, before any work. A Dask worker takes `cuda` as its own current GPU."""
    request = _effective(request)
    if not resolve(request).is_cuda:
        return "cpu"
    return request if request.startswith("cuda:") else "cuda"


def gpu_dtype(config: dict | None) -> str:
    """The dtype a GPU computes a model in: the one it is stored in (bf16 when it does not say)."""
    stored = str((config or {}).get("dtype") or (config or {}).get("torch_dtype") or "bfloat16").removeprefix("torch.")
    return stored if stored in GPU_DTYPES else "bfloat16"


def of_checkpoint(request: str, path) -> Placement:
    """`resolve` for the checkpoint (or quantized folder) at `path`."""
    import json
    from pathlib import Path

    return resolve(request, json.loads((Path(path) / "config.json").read_text()))


def key(device: str) -> list[str]:
    """The cache-key part of a resolved device (`resolved`), from its name alone: the same in every
    process whatever its hardware. A GPU computes in the model's dtype, which the checkpoint's
    digest in the same key fixes; the CPU in float32."""
    device = check(device)
    if device == "auto":
        raise ValueError("a cache key needs a resolved device (cpu, cuda, cuda:N), not auto: this is a bug")
    return ["cpu", "float32"] if device == "cpu" else ["cuda", "model-dtype"]


def require_free(placement: Placement, need: int, what: str) -> None:
    """Refuse, before it starts, work that needs `need` bytes of a GPU that has less free."""
    if not placement.is_cuda:
        return
    import torch

    device = torch.device(placement.device)
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # this process's cached blocks
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
