"""A memory limit for one benchmark process, through a Linux memory cgroup (v1 or v2).

The kernel charges a cgroup for its processes' anonymous memory and for the page cache they
fill; at the limit it reclaims clean file pages (such as a memory-mapped pixel cache) and
kills the process only if anonymous memory alone does not fit. A job that finishes under a
limit smaller than its anonymous peak plus its data therefore streams that data from disk.
"""

from __future__ import annotations

import os
from pathlib import Path

V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOT = Path("/sys/fs/cgroup")


class MemoryCap:
    """A fresh memory cgroup limited to `limit_mb`; `enter()` (in a child, before exec) joins it."""

    def __init__(self, limit_mb: int, name: str):
        self.limit_mb = limit_mb
        if (V1_ROOT / "memory.limit_in_bytes").exists():
            self.path, self.v2 = V1_ROOT / name, False
        elif "memory" in _read(V2_ROOT / "cgroup.controllers").split():
            self.path, self.v2 = V2_ROOT / name, True
        else:
            raise OSError("no memory cgroup controller on this machine")
        self.path.mkdir(exist_ok=True)  # PermissionError when not allowed: the caller reports it
        (self.path / ("memory.max" if self.v2 else "memory.limit_in_bytes")).write_text(str(limit_mb * 2**20))
        # No swapping out instead: the limit must bind on memory, not move it to swap.
        swap = self.path / ("memory.swap.max" if self.v2 else "memory.memsw.limit_in_bytes")
        if swap.exists():
            swap.write_text("0" if self.v2 else str(limit_mb * 2**20))

    def enter(self) -> None:
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def stats(self) -> dict:
        """Peak usage (MB, anonymous memory and page cache together), how much evicted file data
        was read back from disk (MB), major page faults, and OOM kills."""
        prefix = "" if self.v2 else "total_"  # v1 reports the hierarchy's totals under total_*
        stat = dict(line.split()[:2] for line in _read(self.path / "memory.stat").splitlines() if line.strip())
        refaults = int(stat.get(f"{prefix}workingset_refault_file", stat.get(f"{prefix}workingset_refault", 0)))
        if self.v2:
            peak = int(_read(self.path / "memory.peak") or 0)
            events = dict(line.split() for line in _read(self.path / "memory.events").splitlines() if line)
            oom_kills = int(events.get("oom_kill", 0))
        else:
            peak = int(_read(self.path / "memory.max_usage_in_bytes") or 0)
            oom_kills = _oom_kills_v1(self.path)
        return {"peak_usage_mb": peak / 2**20, "reread_mb": refaults * os.sysconf("SC_PAGE_SIZE") / 2**20,
                "major_faults": int(stat.get(f"{prefix}pgmajfault", 0)), "oom_kills": oom_kills}

    def close(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def _oom_kills_v1(path: Path) -> int:
    for line in _read(path / "memory.oom_control").splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
