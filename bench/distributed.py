"""The data-parallel row (issue 16): one epoch of the public Sequential.fit(comm=...) on the numpy backend over
MPI, its gradient sum one-shot (after the whole backward: the peer) and overlapped with backward
(gpubp.distributed.init(overlap=True)), side by side in one run, as a ratio. Run it under mpiexec:

    mpiexec -n 2 python -m bench.distributed [--quick | --smoke] [--threads 1] [--rounds 5] [--out DIR] [--no-save]

Cases: the fit workload's CPU shapes (bench/workloads.py fit_cases) with the shape's batch per rank, and the
first of them at a per-rank batch of 32, where the sum is a larger share of the step (README, "When overlap
matters"). Overlap runs at the default bucket size and at one bucket per layer (bucket_bytes=0).
1. Check: from the same θ0, one float64 epoch of 3 global batches each way; the overlapped parameters must be
   the one-shot's bit for bit on every rank, else the row is REFUSED (failed, no time) and the exit status is 1.
2. Time: `rounds` rounds, each one epoch of every variant in turn (a slow spell of a shared machine falls on all
   of them alike), every rank's BLAS on `threads` threads; a sample is rank 0's wall time from a barrier before
   fit to one after it, over the epoch's global batches: seconds per step. Median and half the interquartile
   range; samples/s counts the global batch's rows. fit's own start (the ranks compare settings, rank 0's state
   is broadcast) is inside every sample, alike for all variants.
Rank 0 prints the table and writes <device>_<date>-distributed-<S>ranks.json and .txt under bench/results (or
--out). No timing is asserted anywhere: a ratio above 1 is a result too.
"""
import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from gpubp import distributed

from . import suite, timing
from . import workloads as wl
from .impls import gpubp_net

PEER = "gpubp-numpy-mpi"          # the one-shot sum after backward
SMALL_BATCH = 32                  # per rank: the sum's share of a step grows as the batch shrinks
CHECK_BATCHES = 3


ONE_BUCKET = 1 << 62              # bucket_bytes no model reaches: the whole buffer is one bucket


def variants():
    """(implementation name, init's overlap settings): the peer first. `-one-bucket` is the control: the
    overlapped path's all-gather and rank-order sum on every rank, but one bucket, started after the whole
    backward, so nothing overlaps; what it gains or loses on the peer is the transport, not the overlap."""
    from gpubp import distributed
    return [(PEER, {"overlap": False}),
            (f"{PEER}-one-bucket", {"overlap": True, "bucket_bytes": ONE_BUCKET}),
            (f"{PEER}-overlap", {"overlap": True, "bucket_bytes": distributed.DEFAULT_BUCKET_BYTES}),
            (f"{PEER}-overlap-per-layer", {"overlap": True, "bucket_bytes": 0})]


def cases(quick, smoke=False):
    """FitSpecs whose batch is per rank: the fit workload's CPU shapes, and the first at SMALL_BATCH rows;
    smoke: its one tiny shape (tests/test_distributed.py runs the row end to end with it)."""
    if smoke:
        return [spec for _, spec in wl.fit_cases("cpu", quick, smoke=True)]
    specs = [spec for _, spec in wl.fit_cases("cpu", quick)]
    first = specs[0]
    specs.append(wl.FitSpec(first.dims, SMALL_BATCH, first.loss, 32 * SMALL_BATCH))
    return specs[:1] + specs[-1:] if quick else specs


def epoch(comm, spec, params0, data, settings, dtype="float32", batches=None):
    """One fit epoch of `spec` from params0 on this rank, with init's `settings`: (net, seconds on rank 0)."""
    comm = distributed.init(**settings)
    X, Y = data
    if batches is not None:
        X, Y = X[:batches * spec.batch * comm.size], Y[:batches * spec.batch * comm.size]
    net, opt = gpubp_net(spec, params0, wl.TIMING_LR, backend="numpy", dtype=dtype)
    X, Y = X.astype(dtype), Y.astype(dtype)
    comm.mpi.Barrier()
    start = time.perf_counter()
    net.fit(X, Y, loss=spec.loss, optimizer=opt, epochs=1, batch_size=spec.batch, shuffle=True, comm=comm)
    comm.mpi.Barrier()
    return net, time.perf_counter() - start


def check(comm, spec, params0, data):
    """{implementation: None, or why it is refused}: the overlapped float64 parameters against the peer's."""
    results = {name: epoch(comm, spec, params0, data, settings, "float64", CHECK_BATCHES)[0].get_params()
               for name, settings in variants()}
    verdicts = {}
    for name, params in results.items():
        same = all(np.array_equal(mine[k], theirs[k]) for mine, theirs in zip(params, results[PEER])
                   for k in mine)
        everywhere = comm.mpi.allreduce(int(same), op=_mpi_min())
        verdicts[name] = None if everywhere else (f"{name}: float64 parameters after {CHECK_BATCHES} global batches "
                                                  f"differ from {PEER}'s on some rank (expected the same bits)")
    return verdicts


def describe(settings, layout):
    """A row's note: how its gradients are summed, and in how many buckets of the float32 model's layout."""
    if not settings["overlap"]:
        return "numpy over MPI, CPU: one-shot sum after backward (gather to rank 0, add, broadcast)"
    buckets = len(distributed.gradient_buckets(layout, 4, settings["bucket_bytes"]))
    if settings["bucket_bytes"] == ONE_BUCKET:
        return "numpy over MPI, CPU: the overlapped path's all-gather with 1 bucket, started after backward (control)"
    return (f"numpy over MPI, CPU: sum overlapped with backward, {buckets} bucket(s) of bucket_bytes="
            f"{settings['bucket_bytes']}")


def _mpi_min():
    from mpi4py import MPI
    return MPI.MIN


def run(comm, quick, rounds, log, smoke=False):
    rows = []
    for spec in cases(quick, smoke):
        rng = np.random.default_rng(0)
        data = wl.fit_data(wl.FitSpec(spec.dims, spec.batch, spec.loss, spec.samples * comm.size), rng)
        params0 = wl.initial_params(spec, rng)
        case = f"{'-'.join(map(str, spec.dims))} b{spec.batch}/rank x{comm.size} ranks"
        steps = spec.batches   # global batches of an epoch: every rank holds all the rows, trains its share
        verdicts = check(comm, spec, params0, data)
        layout = gpubp_net(spec, params0, wl.TIMING_LR, "numpy")[0].layout
        samples = {name: [] for name, _ in variants()}
        for _ in range(rounds):
            for name, settings in variants():
                if verdicts[name] is None:
                    samples[name].append(epoch(comm, spec, params0, data, settings)[1] / steps)
        for name, settings in variants():
            row = suite.new_row(workload="distributed", case=case, impl=name, device="cpu", peer=PEER,
                                params=dict(spec.params(), ranks=comm.size, global_batch=spec.batch * comm.size,
                                            steps=steps, **settings), note=describe(settings, layout))
            if verdicts[name] is not None:
                row.update(status="failed", error=verdicts[name])
            else:
                row.update(status="ok", **timing.Timing(samples[name], 1).as_dict())
                row["samples_per_s"] = spec.batch * comm.size / row["median_s"]
            rows.append(row)
        peer = next(r for r in rows if r["case"] == case and r["impl"] == PEER)
        for row in rows:
            if row["case"] == case and row["status"] == "ok" and peer["status"] == "ok":
                row["ratio_to_peer"] = row["median_s"] / peer["median_s"]
        for row in (r for r in rows if r["case"] == case):
            log(format_row(row))
    return rows


def format_row(row):
    if row["status"] != "ok":
        return f"  {row['case']:<36} {row['impl']:<34} REFUSED: {row['error']}"
    return (f"  {row['case']:<36} {row['impl']:<34} {row['median_s'] * 1e3:8.3f} ms/step ±{row['spread_s'] * 1e3:.3f}"
            f"  {row['samples_per_s']:8.0f} samples/s  {row['ratio_to_peer']:.3f}x {PEER}  ({row['note']})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two cases, the small-batch one among them")
    parser.add_argument("--smoke", action="store_true", help="one tiny case: the row end to end, not a measurement")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads per rank (default 1)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None, help="folder for the JSON and table (default bench/results)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if not distributed.launched_by_mpiexec():
        print("bench.distributed: run it under mpiexec, e.g. mpiexec -n 2 python -m bench.distributed")
        return 77
    comm = distributed.init()
    threads = args.threads
    set_blas_threads(threads)   # stays set until the process ends (threadpoolctl restores only on __exit__)
    log = print if comm.rank == 0 else (lambda line: None)
    log(f"data-parallel fit, numpy backend over MPI, {comm.size} ranks, {threads} BLAS thread(s) each, CPU "
        f"(cores shared with whatever else runs here)")
    rows = run(comm, args.quick, args.rounds, log, args.smoke)
    if comm.rank == 0 and not args.no_save:
        for path in save(rows, comm.size, threads, args.out):
            log(f"wrote {path}")
    return 1 if any(r["status"] != "ok" for r in rows) else 0


def set_blas_threads(threads):
    """numpy's BLAS on `threads` threads in this rank (threadpoolctl; left as it is when that is not installed).
    Not suite.set_threads: that imports torch, which this row does not run."""
    try:
        import threadpoolctl
    except ImportError:
        return
    threadpoolctl.threadpool_limits(threads, user_api="blas")


def save(rows, ranks, threads, out=None):
    from .report import _slug, cpu_model
    now = datetime.datetime.now(datetime.timezone.utc)
    out = Path(out) if out else Path(__file__).resolve().parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"cpu-{_slug(cpu_model())}_{now:%Y%m%d-%H%M}-distributed-{ranks}ranks"
    env = {"date_utc": f"{now:%Y-%m-%dT%H:%M:%SZ}", "cpu": cpu_model(), "cpu_count": os.cpu_count(),
           "ranks": ranks, "threads_per_rank": threads, "loadavg_end": [round(x, 2) for x in os.getloadavg()],
           "argv": sys.argv}
    paths = [out / f"{stem}.json", out / f"{stem}.txt"]
    paths[0].write_text(json.dumps({"schema": 1, "environment": env, "rows": rows}, indent=1, default=str) + "\n")
    paths[1].write_text(f"cpu {env['cpu']}, {ranks} ranks x {threads} BLAS thread(s), {env['date_utc']}, load "
                        f"average at the end {env['loadavg_end']}\n\n" + "\n".join(map(format_row, rows)) + "\n")
    return paths


if __name__ == "__main__":
    sys.exit(main())
