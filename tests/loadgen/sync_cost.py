#!/usr/bin/env python3
"""What one `write` + `fdatasync` costs on this disk, the notification log's
group commit in miniature (tests/loadgen/HISTORY.md, "The log's sync pace").

    python3 tests/loadgen/sync_cost.py [DIR]

For each way of writing, 3,000 writes of 8 KiB, each synced: appending to a
growing file (what the log does), and overwriting a file filled with zeros
beforehand (nothing but data to flush). Prints this process's CPU time
(from getrusage) and the wall time per sync. DIR (default: the system's
temporary folder) should be on the disk the log uses.
"""
import os
import resource
import sys
import tempfile
import time

SYNCS = 3000
BLOCK = 8192


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(directory, preallocated):
    data = b"x" * (BLOCK - 1) + b"\n"
    fd, path = tempfile.mkstemp(dir=directory)
    try:
        if preallocated:
            zeros = b"\0" * (1 << 20)
            for _ in range(SYNCS * BLOCK // len(zeros) + 1):
                os.write(fd, zeros)
            os.fsync(fd)
        else:
            os.close(fd)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        waits = []
        cpu_before = cpu_seconds()
        for i in range(SYNCS):
            started = time.perf_counter()
            if preallocated:
                os.pwrite(fd, data, i * BLOCK)
            else:
                os.write(fd, data)
            os.fdatasync(fd)
            waits.append(time.perf_counter() - started)
        cpu = cpu_seconds() - cpu_before
    finally:
        os.close(fd)
        os.remove(path)
    waits.sort()
    name = "overwrite preallocated" if preallocated else "append"
    print(
        f"{name:>22}: CPU {cpu / SYNCS * 1e6:.1f} us/sync, wall p50 "
        f"{waits[SYNCS // 2] * 1e6:.0f} us, p99 {waits[SYNCS * 99 // 100] * 1e6:.0f} us"
    )


if __name__ == "__main__":
    directory = sys.argv[1] if len(sys.argv) > 1 else tempfile.gettempdir()
    for preallocated in (False, True, False, True):
        measure(directory, preallocated)
