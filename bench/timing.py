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


class Timer:
    """Samples of run(i) (i cycling over n_sets input sets), each `inner` calls between two synchronizes.

    warm() runs the warm-up (compilation, module load, handle creation, caches: not timed), then times one call
    to choose `inner` (a sample lasts about target_s) and how many samples fit in budget_s (at least 3, at most
    repeats). sample(k) takes k more. The suite interleaves the samples of all implementations of a case in
    rounds, so a slow spell of a shared machine falls on every implementation, not on one."""

    def __init__(self, run, sync, n_sets=1, repeats=15, warmup=3, target_s=0.02, budget_s=5.0):
        self.run, self.sync, self.n_sets = run, sync, n_sets
        self.repeats, self.warmup, self.target_s, self.budget_s = repeats, warmup, target_s, budget_s
        self.i, self.inner, self.wanted, self.samples = 0, 1, repeats, []

    def _call(self):
        self.run(self.i % self.n_sets)
        self.i += 1

    def warm(self):
        start = time.perf_counter()
        for _ in range(max(1, self.warmup)):
            self._call()
            self.sync()
            if time.perf_counter() - start > self.budget_s:    # a very slow call: one warm-up is enough
                break
        t0 = time.perf_counter()
        self._call()
        self.sync()
        one = max(time.perf_counter() - t0, 1e-7)
        self.inner = max(1, int(self.target_s / one))
        fewest = 3 if one <= self.budget_s else 1     # calls slower than a whole budget: a single sample
        self.wanted = max(fewest, min(self.repeats, int(self.budget_s / (one * self.inner))))
        return self

    def sample(self, k=1):
        for _ in range(k):
            self.sync()
            start = time.perf_counter()
            for _ in range(self.inner):
                self._call()
            self.sync()
            self.samples.append((time.perf_counter() - start) / self.inner)
        return self

    def timing(self):
        return Timing(self.samples, self.inner)


def measure(run, sync, n_sets=1, repeats=15, warmup=3, target_s=0.02, budget_s=5.0):
    """The median and spread of one implementation alone: warm up, then every sample in a row."""
    timer = Timer(run, sync, n_sets, repeats, warmup, target_s, budget_s).warm()
    return timer.sample(timer.wanted).timing()
