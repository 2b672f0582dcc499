"""Compiled Triton where there is a CUDA device, the Triton interpreter elsewhere, chosen for
expertbits' own kernels only: importing expertbits sets no environment variable and leaves
Triton's settings as other code sees them.

Triton decides between compiling and interpreting when a function is decorated
(`knobs.runtime.interpret`, read from TRITON_INTERPRET): for a kernel of ours, and for the
`@jit` functions of triton.language itself (tl.zeros, ...), decorated when triton is first
imported. Setting TRITON_INTERPRET before that import would decide for the whole process, so
instead our kernels are decorated (`jit`) and launched (`launching`) inside a scope that sets
the knob and stands interpreted twins in for triton.language's compiled functions, restoring
both on exit (one scope at a time in a process). An explicit TRITON_INTERPRET is obeyed, as
Triton users expect. While an interpreted kernel runs, Triton itself patches
`triton.language.core` and leaves that patch in place; harmless without CUDA.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from functools import cache
from typing import Iterator

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction


def interpret() -> bool:
    """Whether expertbits' kernels run in the interpreter: without CUDA, unless TRITON_INTERPRET
    says otherwise (=1 interprets on a GPU machine; =0 compiles on a CPU one, to inspect the
    compiled kernels offline, see benchmarks/compile_fused_moe.py)."""
    if os.environ.get("TRITON_INTERPRET", "").strip():
        return bool(knobs.runtime.interpret)
    return not torch.cuda.is_available()


# One interpreted scope at a time in a process: the knob and triton.language's functions are
# shared, and a thread leaving its scope must not restore them under another one's launch (the
# interpreter holds the GIL anyway, so little is lost). Re-entrant: a thread's nested scope is its own.
_SCOPE = threading.RLock()


@contextmanager
def launching(device: torch.device | None = None) -> Iterator[None]:
    """The scope in which expertbits decorates and launches its kernels. On CUDA, `device` (the
    tensors' own) is made current for the launch: Triton launches on the current device and its
    stream, which need not be the tensors' (`--device cuda:1`)."""
    if not interpret():
        if device is not None and device.type == "cuda":
            with torch.cuda.device(device):
                yield
        else:
            yield
        return
    with _SCOPE:
        if knobs.runtime.interpret:  # TRITON_INTERPRET=1 for the whole process, or this thread's outer scope
            yield
            return
        with knobs.runtime.scope():  # restores the knob (and TRITON_INTERPRET, which setting it sets meanwhile)
            knobs.runtime.interpret = True
            swapped = [(module, name, getattr(module, name)) for module, name, _ in _interpreted_language()]
            try:
                for module, name, twin in _interpreted_language():
                    setattr(module, name, twin)
                yield
            finally:
                for module, name, original in swapped:
                    setattr(module, name, original)


@cache
def _interpreted_language() -> tuple[tuple[object, str, InterpretedFunction], ...]:
    """(module, name, interpreted twin) for every compiled `@jit` function of triton.language."""
    return tuple((m, name, InterpretedFunction(value.fn)) for m in (tl, tl.core, tl.standard, tl.math) for name, value in sorted(vars(m).items())
                 if isinstance(value, JITFunction))


def jit(fn):
    """`triton.jit`, interpreted where `interpret()` says so."""
    with launching():
        return triton.jit(fn)
