"""Peak memory of a block of code, read from /proc/self/status (Linux).

Linux keeps no peak of *anonymous* memory (heap and private pages: what a model's tensors occupy), only of the
whole resident set (VmHWM, which also counts page-cache pages of memory-mapped checkpoints). `PeakMemory`
therefore reports both: `anon_peak` from a thread sampling RssAnon every `interval` seconds (a lower bound that
misses only spikes shorter than the interval), and `rss_peak` from VmHWM, reset at entry by writing 5 to
/proc/self/clear_refs (an upper bound: anonymous plus the file pages mapped at the time). Sizes are in bytes,
measured from the values at entry (`*_growth`), so imports and data loaded before do not count.

Measure in a fresh subprocess: a process that freed memory keeps it in its heap, which hides the next peak.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

STATUS = Path("/proc/self/status")


def status_bytes(key: str) -> int:
    """One `kB` field of /proc/self/status (e.g. RssAnon, VmHWM), in bytes; 0 where it cannot be read."""
    try:
        text = STATUS.read_text()
    except OSError:
        return 0
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def reset_rss_peak() -> bool:
    """Reset VmHWM to the current resident set (clear_refs 5); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class PeakMemory:
    """`with PeakMemory() as m: ...` then `m.anon_growth`, `m.rss_growth` (bytes above the values at entry)."""

    interval: float = 0.001
    anon_start: int = 0
    anon_peak: int = 0
    rss_start: int = 0
    rss_peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.anon_peak = max(self.anon_peak, status_bytes("RssAnon"))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        reset_rss_peak()
        self.anon_start = self.anon_peak = status_bytes("RssAnon")
        self.rss_start = status_bytes("VmRSS")
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.anon_peak = max(self.anon_peak, status_bytes("RssAnon"))
        self.rss_peak = status_bytes("VmHWM")
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def anon_growth(self) -> int:
        return self.anon_peak - self.anon_start

    @property
    def rss_growth(self) -> int:
        return self.rss_peak - self.rss_start

    def to_json(self) -> dict:
        return {"anon_growth_bytes": self.anon_growth, "rss_growth_bytes": self.rss_growth,
                "anon_start_bytes": self.anon_start, "interval_s": self.interval}
