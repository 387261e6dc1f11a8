"""Resident memory of this process and of its worker processes, from Linux /proc.

Used by bench_tokenizer.py. Peaks come from the kernel's high-water mark
(VmHWM, resettable through /proc/self/clear_refs) for this process and from
``getrusage(RUSAGE_CHILDREN)`` for finished children (the largest one);
:class:`TreeMemorySampler` adds the total of the whole process tree at once,
sampled. Outside Linux the functions fall back to getrusage or return 0.
"""

from __future__ import annotations

import os
import resource
import threading


def reset_peak_memory() -> None:
    """Reset this process's VmHWM (Linux >= 4.0); harmless where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
    except OSError:
        pass


def peak_memory_mib() -> float:
    """This process's resident-set high-water mark since the last reset, in MiB."""
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def children_peak_memory_mib() -> float:
    """The largest resident-set peak of any finished child process, in MiB."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def resident_mib(pid: int) -> float:
    """Current resident set of process ``pid`` in MiB; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as file:
            for line in file:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc), across all its threads."""
    children = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as file:
                children += [int(child) for child in file.read().split()]
    except OSError:
        pass
    return children


class TreeMemorySampler:
    """Samples this process's resident set plus its children's, summed, in a thread.

    ``peak_total_mib`` is the largest sum seen; sampling every ``interval``
    seconds can miss a spike shorter than that.
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak_total_mib = 0.0
        self.peak_parent_mib = 0.0
        self.peak_children_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            parent = resident_mib(me)
            children = sum(resident_mib(child) for child in child_pids(me))
            self.peak_parent_mib = max(self.peak_parent_mib, parent)
            self.peak_children_mib = max(self.peak_children_mib, children)
            self.peak_total_mib = max(self.peak_total_mib, parent + children)
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
