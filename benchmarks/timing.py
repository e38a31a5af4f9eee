"""Wall-time medians for the benchmark scripts."""

import statistics
import time


def interleaved_medians(runs: dict, repeats: int) -> dict:
    """Median seconds of each callable in ``runs``, timed in turn so drift in machine load hits all alike."""
    times = {label: [] for label in runs}
    for run in runs.values():
        run()  # warm-up
    for _ in range(repeats):
        for label, run in runs.items():
            start = time.perf_counter()
            run()
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(values) for label, values in times.items()}
