"""The served model's speed (tasks/measure/speed.py), run here on the CPU: both models timed, a
full-precision model that would not fit in memory reported as such, the figures described."""

import pandas as pd
import torch

from expertbits.tasks.measure import speed
from expertbits.tasks.model.load import load
from expertbits.tasks.placement import CPU
from expertbits.tasks.quantization.writer import quantize_checkpoint


def test_both_models_are_timed_and_one_that_does_not_fit_is_said_so(micro_pair, tmp_path, monkeypatch):
    _, ft = micro_pair
    alloc = pd.DataFrame([{"layer": layer, "expert": e, "bits": 3} for layer in range(2) for e in range(4)])
    quantize_checkpoint(ft, alloc, 32, tmp_path / "q")
    model, _ = load(tmp_path / "q", dtype=torch.float32)
    figures = speed.compare(ft, model, CPU, prompt=16, new=4)
    assert figures["device"] == "cpu" and figures["batch"] == 1
    for which in ("quantized", "full_precision"):
        f = figures[which]
        assert f["prefill_tokens_per_s"] > 0 and f["decode_tokens_per_s"] > 0
        assert (f["prompt_tokens"], f["decode_tokens"]) == (16, 4)
    assert "quantized prefill" in speed.describe(figures) and "full precision prefill" in speed.describe(figures)
    monkeypatch.setattr(speed, "_host_available", lambda: 1 << 10)  # a host with 1 KiB left
    small = speed.compare(ft, model, CPU, prompt=16, new=4)
    assert small["full_precision"] == {"measured": False, "why": small["full_precision"]["why"]}
    assert "of host memory to load, 0.0 GiB available" in small["full_precision"]["why"]
    assert "full precision not measured" in speed.describe(small)
