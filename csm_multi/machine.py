"""The machine a figure was measured on, for the benchmarks' JSON."""

from __future__ import annotations


def cpu_name(default: str) -> str:
    """The CPU's model name from /proc/cpuinfo ("Intel(R) Xeon(R) Processor"), else `default`."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), default)
    except OSError:
        return default
