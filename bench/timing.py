"""Timing and checking, the two halves of every benchmark row (llm.c's harness: validate, then time).

    check(got, ref, tol)     ‖got − ref‖ / ‖ref‖ in float64; NaN, inf or a wrong shape never pass: Refused
    measure(run, sync, ...)  warm-up outside the timing, then `repeats` samples of `inner` calls each, a device
                             synchronize before and after each sample; per-call seconds, median and spread

`run(i)` works on input set i; measure cycles i over `n_sets` sets, so repeated calls do not just re-read
what the last call left in the cache. The host clock (perf_counter) with a synchronize around each sample
times what a user waits for; on a GPU each sample holds enough calls (`target_s`) that the synchronize and
launch latency of the sample's edges are a small part of it.
"""
import time

import numpy as np


class Refused(AssertionError):
    """A result that disagrees with the reference: the row is marked failed, never reported as a time."""


def rel_err(got, ref):
    """‖got − ref‖ / ‖ref‖ in float64 (inf for NaN, inf or a shape mismatch)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape or not np.isfinite(got).all():
        return float("inf")
    scale = np.linalg.norm(ref)
    return float(np.linalg.norm(got - ref) / (scale if scale > 0 else 1.0))


def check(got, ref, tol, what):
    """The relative error of `got` against the float64 reference; Refused when it exceeds `tol`."""
    err = rel_err(got, ref)
    if not err <= tol:
        shape = getattr(got, "shape", None)
        raise Refused(f"{what}: result disagrees with the numpy float64 reference: relative error {err:.3g} "
                      f"> tolerance {tol:g} (shape {shape}, reference shape {np.shape(ref)})")
    return err


class Timing:
    """Per-call seconds of one measurement."""

    def __init__(self, samples, inner):
        self.samples = np.asarray(samples, dtype=np.float64)
        self.inner = inner

    @property
    def median(self):
        return float(np.median(self.samples))

    @property
    def spread(self):
        """Half the interquartile range, in seconds: the ± of the median."""
        q1, q3 = np.percentile(self.samples, [25, 75])
        return float(q3 - q1) / 2

    def as_dict(self):
        return {"median_s": self.median, "spread_s": self.spread, "min_s": float(self.samples.min()),
                "max_s": float(self.samples.max()), "repeats": int(self.samples.size), "inner": int(self.inner)}


def measure(run, sync, n_sets=1, repeats=15, warmup=3, target_s=0.02, budget_s=5.0):
    """Median of `repeats` samples of run(i) (i cycling over n_sets input sets), each sample `inner` calls
    timed between two synchronizes. `inner` is chosen from the warm-up so a sample lasts about target_s;
    a slow call gets fewer repeats (at least 3) so one measurement stays near budget_s."""
    i = 0
    for _ in range(max(1, warmup)):      # compilation, module load, handle creation, caches: not timed
        run(i % n_sets)
        i += 1
    sync()
    t0 = time.perf_counter()             # one call, to size the samples
    run(i % n_sets)
    i += 1
    sync()
    one = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(target_s / one))
    repeats = max(3, min(repeats, int(budget_s / (one * inner))))
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(inner):
            run(i % n_sets)
            i += 1
        sync()
        samples.append((time.perf_counter() - start) / inner)
    return Timing(samples, inner)
