"""How much memory the machine has free now: the one reading behind every memory-bounded decision (worker counts,
whether a whole-model check or a data-dependent shape pass fits)."""

from __future__ import annotations

import os


def available_memory() -> int:
    """Bytes of memory available now (Linux MemAvailable, else the free physical pages), or 0 where the system
    does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0
