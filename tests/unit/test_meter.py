"""The stage meter: time and the peak of what the block allocated."""

import sys
import time

import pytest
import torch

from expertbits.tasks.meter import Meter, _status


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_meter_sees_a_short_lived_allocation():
    before = _status("RssAnon")
    with Meter(interval=0.01) as m:
        t = torch.ones(64 << 20)  # 256 MiB, touched
        time.sleep(0.1)
        del t
    fig = m.figures()
    assert fig["seconds"] >= 0.1
    assert fig["peak_anon_bytes"] - before >= 200 << 20
    assert fig["peak_rss_bytes"] >= fig["peak_anon_bytes"] - (64 << 20)  # VmHWM counts it too
