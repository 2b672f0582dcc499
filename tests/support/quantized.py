"""A quantized folder whose experts are at mixed widths."""

from pathlib import Path

import pandas as pd

from expertbits.tasks.checkpoints.adapters import detect
from expertbits.tasks.checkpoints.reader import Checkpoint
from expertbits.tasks.quantization.method import QuantizerConfig
from expertbits.tasks.quantization.writer import quantize_checkpoint


def quantize_mixed(src: Path, out: Path, group_size: int = 32, rotate: bool = False) -> pd.DataFrame:
    """Every expert at one of 2/3/4 bits, neighbours differing, so a mix-up of experts shows;
    `rotate`: RTN in the Hadamard-rotated basis (format version 3)."""
    with Checkpoint.open(src) as c:
        model = detect(c)
    alloc = pd.DataFrame([{"layer": layer.layer, "expert": e, "bits": 2 + (e + layer.layer) % 3}
                          for layer in model.layers for e in range(layer.num_experts)])
    q = QuantizerConfig(rotate=rotate)
    quantize_checkpoint(src, alloc, group_size, out, quantizer=lambda m, w, bits: q.round_matrix(w.float(), bits, group_size),
                        config=q.as_dict())
    return alloc
