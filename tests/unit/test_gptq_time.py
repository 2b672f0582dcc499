"""The up-front GPTQ estimate: its operation count, and the flow's log line on a CPU."""

import pytest

from expertbits.tasks.quantization import gptq_time


def test_the_estimate_counts_every_matrix_and_pass():
    one = gptq_time.estimate_seconds([(4096, 14336)], 1, rate=1e11)
    # Mixtral-8x7B's down projection: 4/3·K³ + 2·N·K² ≈ 5.6e12 operations at 30% of 100 GFLOP/s
    assert one == pytest.approx(5.61e12 / 3e10 + 14336 * gptq_time.COLUMN_SECONDS, rel=0.01)
    assert gptq_time.estimate_seconds([(4096, 14336)] * 3, 4, rate=1e11) == pytest.approx(12 * one)
    assert [gptq_time.human(s) for s in (12, 600, 4 * 3600)] == ["12 s", "10 min", "4.0 h"]


def test_the_probe_measures_a_positive_rate():
    assert gptq_time.probe_rate(size=256, repeats=1) > 1e6
