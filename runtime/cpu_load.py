"""Who else used the CPU during a timed run: ``/proc/stat`` and ``/proc/*/stat`` sampled
around it (on a shared machine timings flip under load; report only quiet groups).

    before = sample_cpu(); ...timed work...; after = sample_cpu()
    contention(before, after, os.getpid(), seconds).cores   # others' mean cores

Linux only; elsewhere ``sample_cpu`` returns an empty sample and contention reads 0.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

QUIET_CORES = 0.15  # other processes' mean CPU use above which a run counts as contended


@dataclass(frozen=True)
class CpuSample:
    """``/proc/stat``'s busy and total jiffies (all CPUs) and each process's CPU jiffies."""

    busy: int
    total: int
    procs: dict[int, tuple[str, int]]  # pid -> (name, utime + stime)


@dataclass(frozen=True)
class Contention:
    """Other processes' CPU use during one run, in cores (mean over the run)."""

    cores: float
    by_process: tuple[tuple[str, float], ...]  # the busiest others, most first

    def contended(self, quiet: float = QUIET_CORES) -> bool:
        return self.cores > quiet


def parse_stat(text: str) -> tuple[int, int]:
    """(busy, total) jiffies from the ``cpu`` line of /proc/stat (idle and iowait are not busy)."""
    values = [int(v) for v in text.splitlines()[0].split()[1:]]
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    return total - values[3] - values[4], total


def parse_proc_stat(text: str) -> tuple[str, int]:
    """(name, utime + stime) from /proc/PID/stat (the name may hold spaces and parentheses)."""
    name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
    return name, int(rest[11]) + int(rest[12])  # fields 14 and 15 of the file


def sample_cpu(proc: Path = Path("/proc")) -> CpuSample:
    try:
        busy, total = parse_stat((proc / "stat").read_text())
    except OSError:  # not Linux
        return CpuSample(0, 0, {})
    procs = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                procs[int(entry.name)] = parse_proc_stat((entry / "stat").read_text())
            except (OSError, ValueError, IndexError):
                continue  # exited meanwhile
    return CpuSample(busy, total, procs)


def contention(before: CpuSample, after: CpuSample, own_pid: int, seconds: float,
               hz: int | None = None) -> Contention:
    """What besides ``own_pid`` used the CPU between two samples: busy jiffies of the whole
    machine less our own (processes that came and went are counted too), and per process."""
    hz = hz or os.sysconf("SC_CLK_TCK")

    def own(sample: CpuSample) -> int:
        return sample.procs.get(own_pid, ("", 0))[1]
    span = max(seconds, 1e-9) * hz
    others = max(0, (after.busy - before.busy) - (own(after) - own(before))) / span
    used = {}
    for pid, (name, jiffies) in after.procs.items():
        delta = jiffies - before.procs.get(pid, (name, 0))[1]
        if pid != own_pid and delta > 0:
            used[f"{name}[{pid}]"] = delta / span
    top = tuple(sorted(used.items(), key=lambda kv: -kv[1])[:3])
    return Contention(round(others, 3), tuple((n, round(c, 3)) for n, c in top))
