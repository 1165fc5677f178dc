"""One whole process timed, for the side-by-side benchmarks (basin vs mergekit 0.1.5): the same routine for both.

`timed(cmd, env)` runs `cmd` as a subprocess and reaps it with `os.wait4`, whose rusage is that one child's own
(not the sum or maximum over earlier children, as RUSAGE_CHILDREN would be): wall seconds, CPU seconds
(user + system: less sensitive to a loaded machine than wall time) and peak RSS (ru_maxrss, KiB on Linux).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time


def timed(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """{"seconds", "cpu_seconds", "peak_rss_mb"} of one whole process; a failure raises with its stderr's tail."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {err.read().decode(errors='replace')[-2000:]}")
    return {"seconds": round(seconds, 3), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}
