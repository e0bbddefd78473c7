"""The one timer the benchmarks share."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], repeats: int, cpu: bool = False) -> float:
    """Median wall time of `fn` in seconds, or its CPU time (all threads) with cpu=True: steadier when shared."""
    clock = time.process_time if cpu else time.perf_counter
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)
