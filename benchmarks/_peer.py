"""One whole process timed, for the side-by-side benchmarks (basin vs mergekit 0.1.5): the same routine for both.

`timed(cmd, env)` runs `cmd` under a small launcher (a fresh `python -S`: a few MB) that forks, execs `cmd` and
reaps it with `os.wait4`: wall seconds, CPU seconds (user + system: less sensitive to a loaded machine than wall
time) and peak RSS (ru_maxrss, KiB on Linux) of that one process. Not forked from the benchmark itself: Linux
carries the forking process's resident set into a child's ru_maxrss (the copied page tables, then the old mm's
high-water mark recorded at exec), so a child of a benchmark holding 1 GB would report at least 1 GB whatever
it used; nor RUSAGE_CHILDREN, the maximum over every earlier child.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

LAUNCHER = """
import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - start
with open(sys.argv[1], "w") as f:
    json.dump({"code": os.waitstatus_to_exitcode(status), "seconds": seconds,
               "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_kib": usage.ru_maxrss}, f)
"""


def timed(cmd: list[str], env: dict[str, str] | None = None, stdout: bool = False) -> dict:
    """{"seconds", "cpu_seconds", "peak_rss_mb"} of one whole process (and its "stdout" text when asked); a
    failure raises with its stderr's tail."""
    with tempfile.TemporaryDirectory(prefix="basin-peer-") as tmp, \
            open(os.path.join(tmp, "out"), "wb+") as out, open(os.path.join(tmp, "err"), "wb+") as err:
        report = os.path.join(tmp, "report.json")
        subprocess.run([sys.executable, "-S", "-c", LAUNCHER, report, *cmd], stdout=out, stderr=err, env=env,
                       check=False)
        usage = json.loads(open(report).read()) if os.path.exists(report) else {"code": -1}
        if usage["code"] != 0:
            err.seek(0)
            raise RuntimeError(f"{cmd[0]} failed ({usage['code']}): {err.read().decode(errors='replace')[-2000:]}")
        out.seek(0)
        text = out.read().decode(errors="replace")
    return {"seconds": round(usage["seconds"], 3), "cpu_seconds": round(usage["cpu_seconds"], 3),
            "peak_rss_mb": round(usage["peak_rss_kib"] / 1024, 1), **({"stdout": text} if stdout else {})}
