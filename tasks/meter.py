"""Wall time and peak memory of a block of work, for the stage summaries and the benchmarks.

Two peaks are kept apart, because they mean different things:

* `peak_anon_bytes`: anonymous resident memory (what the process allocated: tensors, arrays),
  sampled from /proc/self/status every `interval` seconds; what the memory targets are about;
* `peak_rss_bytes`: the kernel's own high-water mark of all resident memory (VmHWM, reset at the
  start of the block), which also counts pages of memory-mapped safetensors files that the
  kernel may drop at any time.

Off Linux both are None. Sampling can miss a peak shorter than `interval`; VmHWM cannot, but it
is per process: blocks metered at once in threads of one process share it.

* `peak_gpu_bytes`: where the block used CUDA, the most GPU memory torch held allocated at once
  (`torch.cuda.max_memory_allocated`, reset at the start; the largest over the devices used),
  else None. It counts tensors, not the CUDA context nor the allocator's cached free blocks.

Stage figures are logged, never written into the content-addressed artifacts (which stay
byte-identical across reruns); with EXPERTBITS_MEASURE_FILE set, each stage also appends one
JSON line there (benchmarks/bench_realsize.py reads them).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Meter:
    """`with Meter() as m: ...`, then `m.figures()`."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak_anon, self.start, self.seconds = interval, None, 0.0, None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while True:
            anon = _status("RssAnon")
            if anon is not None:
                self.peak_anon = max(self.peak_anon or 0, anon)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "Meter":
        self._reset = True
        try:  # "5" resets the peak resident set size (VmHWM) of this process
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self._reset = False  # VmHWM would be the process's lifetime peak: not reported
        self._cuda_reset()
        self.start = time.perf_counter()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="expertbits-meter")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
        self._stop.set()
        self._thread.join()
        self.peak_rss = _status("VmHWM") if self._reset else None
        self.peak_gpu = self._cuda_peak()

    @staticmethod
    def _cuda():
        """torch.cuda if this process has initialised CUDA (never initialises it, never imports torch)."""
        torch = sys.modules.get("torch")
        return torch.cuda if torch is not None and torch.cuda.is_initialized() else None

    def _cuda_reset(self) -> None:
        if cuda := self._cuda():
            for d in range(cuda.device_count()):
                cuda.reset_peak_memory_stats(d)

    def _cuda_peak(self) -> int | None:
        # CUDA first used inside the block starts its peak at zero: no reset needed
        if cuda := self._cuda():
            return max(cuda.max_memory_allocated(d) for d in range(cuda.device_count()))
        return None

    def figures(self) -> dict:
        return {"seconds": round(self.seconds, 3), "peak_anon_bytes": self.peak_anon,
                "peak_rss_bytes": getattr(self, "peak_rss", None), "peak_gpu_bytes": getattr(self, "peak_gpu", None)}


def report(stage: str, meter: Meter, weight_bytes: int | None = None, logger=None) -> dict:
    """Log a stage's figures (and append them to $EXPERTBITS_MEASURE_FILE); `weight_bytes` is the
    expert weight the stage went through, for GB/s."""
    fig = dict(meter.figures(), stage=stage, weight_bytes=weight_bytes)
    if weight_bytes and meter.seconds:
        fig["weight_gb_per_s"] = round(weight_bytes / 1e9 / meter.seconds, 3)
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b is not None else "n/a"  # noqa: E731
    if logger is not None:
        logger.info(f"{stage}: {meter.seconds:.1f} s, peak anonymous memory {gib(meter.peak_anon)}, "
                    f"peak resident {gib(fig['peak_rss_bytes'])}"
                    + (f", peak GPU memory {gib(fig['peak_gpu_bytes'])}" if fig["peak_gpu_bytes"] is not None else ""))
    if path := os.environ.get("EXPERTBITS_MEASURE_FILE"):
        with open(path, "a") as f:
            f.write(json.dumps(fig) + "\n")
    return fig
