"""expertbits.kernels: Triton kernels, their launch wrappers and pure-torch references.

Without a CUDA device the kernels run in the Triton interpreter. Triton settles that when it is
first imported, and loading a transformers model imports it, so the choice is made here, when
anything of expertbits.kernels is imported, ahead of any model.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
