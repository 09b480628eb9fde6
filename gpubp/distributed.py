"""Data-parallel training: one process per GPU (or per CPU socket), each with the whole model, each training on
its share of every batch (issue 16).

    comm = gpubp.distributed.init()     # first: under mpiexec, this process's rank; alone, a size-1 communicator
    net = gpubp.Sequential(...)          # each rank's GPU was picked from its local rank by init
    history = net.fit(X, y, "softmax_ce", opt, batch_size=64, comm=comm)   # 64 rows per rank per step
    if comm.rank == 0:
        net.save("model.npz")

A step of fit(comm=comm) with S ranks and batch_size B:
  - every rank holds the whole X and y and draws the same permutation (rank 0's generator, broadcast at the
    start); global batch g is permutation[g·B·S : (g+1)·B·S], and rank r takes its r-th slice of B rows of it.
    The last global batch may leave a rank fewer rows, or none (it then contributes zeros).
  - after backward each rank multiplies its mean gradient and its loss by n_r / n (its rows over the global
    batch's rows) and the ranks sum them: every rank then holds the mean gradient and the loss of the whole
    global batch, the same bits on every rank. One call over one buffer: the gradients with the loss beside
    them (Sequential.reduce_buffer).
  - the guard, the update and the bookkeeping then see identical values on every rank, so every rank takes or
    skips the step together: a non-finite value on any rank makes the sum non-finite on all of them (IEEE
    addition keeps NaN and inf). That is how the guard's fault flag is reduced, at no extra cost.
So S ranks with batch_size B train the model a single process trains with batch_size B·S, to rounding.

Overlap (init(overlap=True, bucket_bytes=...); off by default). The sum above runs once, after the whole
backward. With overlap on, the reduce buffer is cut into buckets of whole layers (gradient_buckets: from the last
layer, a bucket closes once it holds bucket_bytes), and backward calls GradientReduction.gradients_ready(l) as
soon as layer l's dW and db are written: when that completes a bucket, its non-blocking sum starts and the next
layer's backward runs meanwhile; the guard waits for all of them. Every element is still the same sum in the
same order, so the parameters are the same bits as without overlap (on MPI; see MpiTransport.start_sum).

At the start of fit the ranks compare what they were asked to do (architecture, dtype, precision, optimizer,
loss, batch size, epochs, rows, ...): any difference is the same ValueError on every rank, naming the ranks.
Then rank 0's model state (parameters, optimizer state, step count, shuffling generator, fp16 loss scaler) is
broadcast. At the end of each epoch the loss, correct-prediction and row sums are added across ranks, so the
History holds the global metrics. Validation runs on every rank (identical parameters, identical results).

Transports, picked from the model's backend (TRANSPORT_FOR_BACKEND):
  mpi    numpy arrays through mpi4py; a sum is gathered to rank 0, added there in rank order, and broadcast,
         so float64 results are reproducible bit for bit.
  nccl   device arrays of the GPU backends; cupy.cuda.nccl's in-place allReduce on the current stream, which a
         CUDA graph can capture; the NCCL unique id travels over MPI. NOT tested on a GPU yet; its overlapped
         path (each bucket's allReduce on a side stream) has never run at all.

Faults. Every host-side wait has a deadline (init's `timeout`): past it the rank aborts the whole job (MPI_Abort)
saying which rank waited for what. An uncaught exception on any rank prints its traceback under the rank's name
and aborts the job, as `python -m mpi4py` does. A killed rank ends the job: mpiexec kills the others. NCCL's
waits are on the device and have no deadline here.
"""
import json
import math
import numbers
import os
import sys
import time
import traceback

import numpy as np

DEFAULT_TIMEOUT = 600.0     # seconds a rank waits for the others before it aborts the job
# init(overlap=True)'s default bucket: a bucket of layers closes once it holds this many bytes of gradients.
# Fewer, larger buckets cost fewer calls (each has a fixed latency); smaller ones start sooner.
DEFAULT_BUCKET_BYTES = 1 << 20
TRANSPORT_FOR_BACKEND = {"numpy": "mpi", "cupy": "nccl", "numba": "nccl"}
# Set by the launchers of MPICH (hydra) and Intel MPI, Open MPI, and PMIx-based ones (srun --mpi=pmix).
_LAUNCH_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")

_world = None   # the communicator init() made under mpiexec; MPI is one per process


def launched_by_mpiexec():
    """True when an MPI launcher started this process (its environment says so)."""
    return any(name in os.environ for name in _LAUNCH_VARIABLES)


def init(backend="auto", timeout=DEFAULT_TIMEOUT, overlap=False, bucket_bytes=DEFAULT_BUCKET_BYTES):
    """This process's Communicator. Under mpiexec: MPI's world, and the transport for the gradients: "nccl" for
    the GPU backends, "mpi" for numpy ("auto": nccl where gpubp's backend="auto" picks a GPU backend, else mpi).
    Without mpiexec: a size-1 communicator with no transport, so the same script runs alone (fit then trains as
    if no comm were given). Call it before building models: it picks this rank's GPU (local rank modulo the
    GPUs of its machine). `timeout`: seconds a rank waits for the others before aborting the job.
    overlap: sum each bucket of layers' gradients across the ranks while backward goes on (see the module's
    docstring); the same parameters, bit for bit on MPI. bucket_bytes: with overlap, a bucket of consecutive
    layers, from the last, closes once it holds at least this many bytes (0: one bucket per layer). Every rank
    must ask for the same (fit checks). Calling init again under mpiexec returns the same communicator with
    these settings changed."""
    global _world
    if backend not in ("auto", "mpi", "nccl"):
        raise ValueError(f"backend: expected 'auto', 'mpi' or 'nccl', got {backend!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not 0 < timeout < float("inf"):
        raise ValueError(f"timeout: expected a positive number of seconds, got {timeout!r}")
    if not isinstance(overlap, bool):
        raise ValueError(f"overlap: expected True or False, got {overlap!r}")
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, numbers.Integral) or bucket_bytes < 0:
        raise ValueError(f"bucket_bytes: expected a non-negative integer (bytes; 0: one bucket per layer), got "
                         f"{bucket_bytes!r}")
    if not launched_by_mpiexec():
        return Communicator(timeout=timeout, overlap=overlap, bucket_bytes=bucket_bytes)
    if _world is not None:   # MPI is initialised once per process: the same world, asked for the same transport
        if backend not in ("auto", _world.requested):
            raise ValueError(f"init: already initialised with backend={_world.requested!r}, asked for {backend!r}")
        _world.timeout, _world.overlap, _world.bucket_bytes = float(timeout), overlap, int(bucket_bytes)
        return _world
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise RuntimeError(f"gpubp.distributed.init: this process was started by mpiexec but mpi4py cannot be "
                           f"imported ({exc}); pip install 'gpubp[mpi]'") from None
    mpi = MPI.COMM_WORLD
    local_rank = mpi.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    _use_local_gpu(local_rank)
    _world = Communicator(mpi.Get_rank(), mpi.Get_size(), local_rank, mpi, requested=backend, timeout=timeout,
                          overlap=overlap, bucket_bytes=bucket_bytes)
    if _world.size > 1:
        _abort_on_uncaught_exceptions(_world)
    name = backend if backend != "auto" else TRANSPORT_FOR_BACKEND[_auto_backend_name()]
    _world.transport = TRANSPORTS[name](_world)
    return _world


def check_comm(comm):
    """fit's `comm` argument: None, or a Communicator with a transport (None for init()'s size-1 communicator
    without mpiexec, which has none: fit then trains exactly as without comm)."""
    if comm is None:
        return None
    if not isinstance(comm, Communicator):
        raise TypeError(f"comm: expected None or gpubp.distributed.init()'s communicator, got {type(comm).__name__}")
    return comm if comm.transport is not None else None


def abort_job(message, status=1):
    """End every process of the job when this one is a rank of a job of several (init was called under
    mpiexec); else do nothing. For a failure the other ranks would otherwise wait for (the command line's)."""
    if _world is not None and _world.size > 1:
        _world.abort(message, status)


def share_batches(permutation, batch_size, rank, size):
    """(rank's rows of the epoch in the order it trains on them, the global batch's row count at each of its
    steps): global batch g is permutation[g·B·S : (g+1)·B·S] (B = batch_size, S = size), and the rank takes its
    rows r·B … (r+1)·B − 1, fewer in the last global batch, or none (its last step then has 0 rows)."""
    global_batch = batch_size * size
    rows, global_rows = [], []
    for start in range(0, len(permutation), global_batch):
        n_global = min(global_batch, len(permutation) - start)
        rows.append(permutation[start + rank * batch_size:start + min((rank + 1) * batch_size, n_global)])
        global_rows.append(n_global)
    return np.concatenate(rows), global_rows


def gradient_buckets(layout, itemsize, bucket_bytes):
    """The overlapped reduction's buckets over a model's reduce buffer (its flat gradients, padding included,
    then the loss slot): [(layer, start, end)] in the order backward completes them, last layer first. A bucket
    takes consecutive layers, from the last, until it holds at least bucket_bytes (0: one layer each; layer 0
    closes the last one); `layer` is its lowest layer, whose gradients are the last of it to be written. The
    last layer's bucket holds the loss slot too: the loss is written before backward starts."""
    layer_start = {}
    for layer, _, _, offset in layout.entries:
        layer_start.setdefault(layer, offset)
    buckets, end = [], layout.size + 1
    for layer in reversed(range(layout.n_layers)):
        start = layer_start[layer]
        if layer == 0 or (end - start) * itemsize >= bucket_bytes:
            buckets.append((layer, start, end))
            end = start
    return buckets


def add_in_rank_order(total, parts):
    """In place: total = parts[0] + parts[1] + ... (one row per rank), added in that order. Floating-point
    addition is not associative: one fixed order gives the same bits on every rank, run after run."""
    np.copyto(total, parts[0])
    for part in parts[1:]:
        total += part


class Communicator:
    """This process's place in the job: `rank` (0 … size − 1), `size`, `local_rank` (its index among the ranks
    of its machine: the GPU it uses), and `transport` (how gradients travel: MpiTransport, NcclTransport, or None
    at size 1); `overlap` and `bucket_bytes`, init's settings for fit's gradient sums. The host-side collectives
    below are for small things (settings, sums, the state broadcast at the start of fit); each waits at most
    `timeout` seconds, then aborts the job. At size 1 they return their input."""

    def __init__(self, rank=0, size=1, local_rank=0, mpi=None, requested="auto", timeout=DEFAULT_TIMEOUT,
                 overlap=False, bucket_bytes=DEFAULT_BUCKET_BYTES):
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self.mpi, self.requested, self.timeout = mpi, requested, float(timeout)
        self.overlap, self.bucket_bytes = overlap, int(bucket_bytes)
        self.transport = None

    def __repr__(self):
        transport = self.transport.name if self.transport is not None else None
        return (f"Communicator(rank={self.rank}, size={self.size}, local_rank={self.local_rank}, "
                f"transport={transport!r}, overlap={self.overlap})")

    def abort(self, message, status=1):
        """Print `message` under this rank's name and end every process of the job (MPI_Abort)."""
        sys.stderr.write(f"gpubp: rank {self.rank} of {self.size}: {message}; aborting the job\n")
        sys.stderr.flush()
        if self.mpi is not None and self.size > 1:
            self.mpi.Abort(status)
        sys.exit(status)

    @staticmethod
    def test_all(requests):
        """Whether every non-blocking MPI request of the list is done (MPI_Testall). Also what moves them on:
        without an asynchronous progress thread (mpich's default), MPI advances them only inside MPI calls."""
        from mpi4py import MPI
        return MPI.Request.Testall(requests)

    def _wait(self, requests, what):
        """Wait for a non-blocking MPI request, or a list of them, at most `timeout` seconds; then abort the job.
        Polls with short sleeps: the ranks of a job on one machine share its cores, and a spinning wait would
        take one."""
        requests = requests if isinstance(requests, list) else [requests]
        deadline = time.monotonic() + self.timeout
        pause = 0.0
        while not self.test_all(requests):
            if time.monotonic() > deadline:
                self.abort(f"timed out after {self.timeout:g} s waiting for the other ranks ({what}): one of them "
                           "is stuck, dead or doing something else")
            time.sleep(pause)
            pause = min(2 * pause + 1e-6, 1e-3)

    def sum_in_rank_order(self, array, what="a sum"):
        """In place: `array` (a numpy array, the same shape and dtype on every rank) becomes the sum over ranks,
        added in rank order on rank 0 and broadcast, so every rank gets the same bits, run after run."""
        if self.size == 1:
            return array
        parts = self._parts(array) if self.rank == 0 else None
        self._wait(self.mpi.Igather(array, parts, root=0), what)
        if self.rank == 0:
            add_in_rank_order(array, parts)
        self._wait(self.mpi.Ibcast(array, root=0), what)
        return array

    def _parts(self, array):
        """Rank 0's receive buffer for a gather of `array` from every rank, made once per shape and dtype."""
        key = (array.shape, array.dtype.str)
        cache = self.__dict__.setdefault("_gather_buffers", {})
        if key not in cache:
            cache[key] = np.empty((self.size,) + array.shape, array.dtype)
        return cache[key]

    def broadcast(self, array, what="a broadcast"):
        """In place: rank 0's `array` on every rank (same shape and dtype everywhere)."""
        if self.size == 1:
            return array
        self._wait(self.mpi.Ibcast(array, root=0), what)
        return array

    def broadcast_object(self, obj, what="a broadcast"):
        """Rank 0's JSON-able `obj` on every rank."""
        if self.size == 1:
            return obj
        data = json.dumps(obj).encode() if self.rank == 0 else b""
        length = self.broadcast(np.array([len(data)], np.int64), what)
        buffer = np.frombuffer(data, np.uint8).copy() if self.rank == 0 else np.empty(int(length[0]), np.uint8)
        return json.loads(self.broadcast(buffer, what).tobytes().decode())

    def allgather_object(self, obj, what="an all-gather"):
        """[every rank's JSON-able `obj`] in rank order, on every rank."""
        if self.size == 1:
            return [json.loads(json.dumps(obj))]
        data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
        lengths = np.empty(self.size, np.int64)
        self._wait(self.mpi.Iallgather(np.array([data.size], np.int64), lengths), what)
        gathered = np.empty(int(lengths.sum()), np.uint8)
        self._wait(self.mpi.Iallgatherv(data, (gathered, lengths)), what)
        ends = np.cumsum(lengths)
        return [json.loads(gathered[end - n:end].tobytes().decode()) for n, end in zip(lengths, ends)]

    def data_parallel(self, net, optimizer, settings, log_every=None):
        """What fit(comm=self) trains through: the ranks agree on `settings` and the model (else ValueError on
        every rank), rank 0's model state is broadcast, then a DataParallel shares out batches and sums steps.
        log_every: this rank's wish for reading the device every so many steps (its progress bar, callbacks)."""
        return DataParallel(self, net, optimizer, settings, log_every)


def _describe(net, optimizer):
    """What must be the same on every rank for the ranks to train one model together."""
    layers = [f"{layer.n_in}->{layer.n_out} {layer.activation}" + ("" if layer.bias else " no bias")
              + (f" alpha={layer.alpha}" if layer.activation == "leaky_relu" else "") for layer in net.layers]
    return {"layers": layers, "dtype": net.dtype.name,
            "precision": net.precision, "deterministic": net.deterministic, "backend": net.backend.name,
            "optimizer": [type(optimizer).__name__, optimizer.config()]}


class DataParallel:
    """One fit's link between the ranks (see the module docstring): share() gives this rank its rows of each
    global batch, gradient_reduction() what a step calls in backward and before the guard, sum_epoch() the
    epoch's global sums, any_rank() a stop asked for on any rank. read_every: the steps at which every rank
    reads the device, so that all see a fault at the same step: the greatest common divisor of the ranks'
    log_every (rank 0's when only it shows a progress bar), None when no rank asked. buckets: the overlapped
    reduction's (gradient_buckets), None without overlap."""

    def __init__(self, comm, net, optimizer, settings, log_every=None):
        self.comm, self.net = comm, net
        # the ranks must cut the buffer alike: their bucket sums are matched collectives
        settings = dict(settings, overlap=f"on, bucket_bytes={comm.bucket_bytes}" if comm.overlap else "off")
        self.read_every = self._agree(dict(_describe(net, optimizer), **settings), log_every)
        self.buckets = (gradient_buckets(net.layout, net.dtype.itemsize, comm.bucket_bytes) if comm.overlap
                        else None)
        self._broadcast_state(optimizer)

    def _agree(self, description, log_every):
        comm, transport = self.comm, self.comm.transport
        wanted = TRANSPORT_FOR_BACKEND.get(self.net.backend.name)
        problem = None
        if transport is None or transport.name != wanted:
            problem = (f"its model is on the {self.net.backend.name} backend, whose arrays travel by {wanted}, but "
                       f"its communicator's transport is {getattr(transport, 'name', None)}; call "
                       f"gpubp.distributed.init(backend={wanted!r}) or build the model on a matching backend")
        everyone = comm.allgather_object({"description": description, "problem": problem, "log_every": log_every},
                                         "the ranks comparing their models and fit settings")
        problems = [f"rank {r}: {d['problem']}" for r, d in enumerate(everyone) if d["problem"]]
        if problems:
            raise ValueError("fit(comm=...): " + "; ".join(problems))
        reference = everyone[0]["description"]
        for r, d in enumerate(everyone[1:], 1):
            differ = [k for k in reference if d["description"].get(k) != reference[k]]
            if differ:
                raise ValueError("fit(comm=...): every rank must train the same model the same way, but "
                                 + "; ".join(f"rank {r} has {k}={d['description'].get(k)!r} where rank 0 has "
                                             f"{k}={reference[k]!r}" for k in differ))
        wishes = [d["log_every"] for d in everyone if d["log_every"] is not None]
        return math.gcd(*wishes) if wishes else None

    def _broadcast_state(self, optimizer):
        """Rank 0's parameters, optimizer state, step count, shuffling generator and loss scaler on every rank."""
        comm, net, be = self.comm, self.net, self.net.backend
        what = "rank 0's model state at the start of fit"
        meta = comm.broadcast_object({"steps": net.steps, "rng": net.rng.bit_generator.state}, what)
        arrays = {"params": be.to_numpy(net.params), **optimizer.state_arrays()}
        if net.scaler is not None:
            arrays["loss_scaler"] = be.to_numpy(net.scaler)
        for name in sorted(arrays):
            arrays[name] = comm.broadcast(np.ascontiguousarray(arrays[name]), what)
        if comm.rank == 0:
            return
        be.copy_into(net.params, arrays.pop("params"))
        if "loss_scaler" in arrays:
            be.copy_into(net.scaler, arrays.pop("loss_scaler"))
        optimizer.load_state_arrays(arrays)
        net.rng.bit_generator.state = meta["rng"]
        net.steps = meta["steps"]

    def share(self, permutation, batch_size):
        """This rank's rows of the epoch and each step's global rows (share_batches)."""
        return share_batches(permutation, batch_size, self.comm.rank, self.comm.size)

    def gradient_reduction(self, n, n_global, loss):
        """The GradientReduction of a step of n of this rank's rows (0: none) in a global batch of n_global rows;
        `loss`: where the step writes its mean loss, (1,) (None when n = 0)."""
        return GradientReduction(self.net, self.comm.transport, self.buckets, n / n_global, loss)

    def any_rank(self, flag):
        """True on every rank when `flag` is true on some rank (a callback asked to stop training)."""
        return bool(self.comm.sum_in_rank_order(np.array([float(bool(flag))]), "the ranks' stop requests")[0])

    def sum_epoch(self, sums):
        """The epoch's (loss sum, correct, rows), float64 numpy, summed over the ranks."""
        return self.comm.sum_in_rank_order(np.array(sums, np.float64), "the epoch's loss and accuracy sums")


class GradientReduction:
    """One step's sum across the ranks: this rank's mean gradients and loss, in the model's reduce buffer, become
    the global batch's. The step calls gradients_ready(l) in backward as soon as layer l's dW and db are written
    (last layer first), then finish() before the guard, which returns the loss slot. Made once per (n, n_global)
    and kept by the step's closure: the weight n / n_global is a constant, so a captured graph replays it.

    One-shot (buckets None, the default): finish weighs the whole buffer and sums it in one call; gradients_ready
    does nothing. Overlapped (buckets from gradient_buckets): gradients_ready starts the non-blocking sum of a
    bucket as soon as its lowest layer is done, and lets the sums already started move on; finish starts what is
    left (all of it on a rank without rows, which runs no backward), waits for every sum and completes them.
    Either way each element is weighed alike and summed in the same order: the same bits."""

    WHAT = "the gradients of a step"

    def __init__(self, net, transport, buckets, weight, loss):
        self.transport, self.buckets, self.weight = transport, buckets, weight
        self.buffer = net.reduce_buffer
        self.values = transport.array(self.buffer)
        self.loss = None if loss is None else transport.array(loss)
        self.loss_slot = net.backend.view(self.buffer, self.buffer.shape[0] - 1, (1,))
        self.started = 0   # buckets whose sum has started in this step

    def _weigh(self, start, end):
        """values[start:end] becomes this rank's share of the sum: its mean gradients, and its mean loss in the
        last slot, times n / n_global (a mean over n rows -> its part of the mean over n_global); zeros on a
        rank with no rows in the step."""
        share = self.values[start:end]
        if self.loss is None:
            share.fill(0)
            return
        if end == self.values.shape[0]:
            share[-1:] = self.loss
        share *= self.weight

    def _start_next_bucket(self):
        _, start, end = self.buckets[self.started]
        self._weigh(start, end)
        self.transport.start_sum(self.buffer, start, end)
        self.started += 1

    def gradients_ready(self, layer):
        """Layer `layer`'s dW and db are written (backward calls this last layer first)."""
        if self.buckets is None:
            return
        if self.started < len(self.buckets) and self.buckets[self.started][0] == layer:
            self._start_next_bucket()
        self.transport.progress()

    def finish(self):
        """Every sum done: the reduce buffer holds the global batch's gradients; returns its loss slot."""
        if self.buckets is None:
            self._weigh(0, self.values.shape[0])
            self.transport.sum(self.buffer, self.WHAT)
        else:
            while self.started < len(self.buckets):
                self._start_next_bucket()
            self.transport.finish_sums(self.WHAT)
            self.started = 0
        return self.loss_slot


# ---- transports: how a flat device buffer is summed across the ranks ------------------------------------------
class MpiTransport:
    """numpy arrays through MPI. One-shot (sum): gathered to rank 0, added in rank order, broadcast
    (Communicator.sum_in_rank_order); rank 0 receives S buffers: fine for the CPU-sized models of the numpy
    backend. Overlapped (start_sum, progress, finish_sums): one MPI_Iallgather per bucket, added in rank order on
    every rank."""

    name = "mpi"

    def __init__(self, comm):
        self.comm = comm
        self._pending = []     # the overlapped sums started and not finished: (request, values, every rank's copy)
        self._received = {}    # (length, dtype) -> (size × length,): every rank's copy of a buffer, cut per bucket

    @staticmethod
    def array(buffer):
        return buffer

    def sum(self, buffer, what):
        self.comm.sum_in_rank_order(buffer, what)

    def start_sum(self, buffer, start, end):
        """Start summing buffer[start:end] across the ranks, without waiting. NOTE: the sum must be the one-shot
        path's, element by element: rank 0's copy, plus rank 1's, ... in that order. MPI's own reductions
        (Iallreduce) may add in any order, and a gather to rank 0 followed by a broadcast would be two
        dependent steps, the second needing rank 0 to add in between. So every rank all-gathers every rank's
        copy of the bucket (one non-blocking call, MPI_Iallgather) and adds them itself in finish_sums: the same
        additions in the same order on every rank. The cost: each rank receives S copies of the buffer (S × its
        size in memory, kept between steps) and does rank 0's S − 1 additions, where the one-shot path has rank
        0 receive S and the others 1. For S = 2 the bytes moved are the same; they grow as S² in all."""
        if self.comm.size == 1:
            return          # the sum over one rank: the buffer as it is
        key = (buffer.shape[0], buffer.dtype.str)
        if key not in self._received:
            self._received[key] = np.empty(self.comm.size * buffer.shape[0], buffer.dtype)
        received = self._received[key][self.comm.size * start:self.comm.size * end]
        every_rank = received.reshape(self.comm.size, end - start)
        values = buffer[start:end]
        self._pending.append((self.comm.mpi.Iallgather(values, every_rank), values, every_rank))

    def progress(self):
        """Let the started sums move on. NOTE: mpich (the mpich wheel's, and most builds) has no asynchronous
        progress thread unless asked (MPIR_CVAR_ASYNC_PROGRESS=1, which needs MPI_THREAD_MULTIPLE): a
        non-blocking call advances only while this process is inside an MPI call. One MPI_Testall per layer of
        backward gives the earlier buckets' messages those moments."""
        if self._pending:
            self.comm.test_all([request for request, _, _ in self._pending])

    def finish_sums(self, what):
        """Wait for every started sum (at most the communicator's timeout), then add each bucket's copies in
        rank order into the buffer."""
        if not self._pending:
            return
        self.comm._wait([request for request, _, _ in self._pending], what)
        for _, values, every_rank in self._pending:
            add_in_rank_order(values, every_rank)
        self._pending.clear()


class NcclTransport:
    """Device arrays (cupy, or numba's through __cuda_array_interface__) through NCCL (cupy.cuda.nccl): one
    in-place ncclAllReduce (sum) per call, on CuPy's current stream, so it is ordered after the backward
    kernels, needs no host synchronisation, and is captured by a CUDA graph with the rest of the step.
    The unique id is made on rank 0 and broadcast over MPI. NOTE: untested without a GPU."""

    name = "nccl"

    def __init__(self, comm):
        try:
            import cupy
            from cupy.cuda import nccl
        except ImportError as exc:
            raise RuntimeError(f"the nccl transport needs CuPy with NCCL ({exc}); install gpubp[cuda12] or "
                               "gpubp[cuda13], or init(backend='mpi') for the numpy backend") from None
        if not nccl.available:
            raise RuntimeError("the nccl transport needs NCCL, which CuPy could not load here; pip install "
                               "nvidia-nccl-cu12 (or -cu13), or init(backend='mpi') for the numpy backend")
        self.cupy, self.nccl = cupy, nccl
        unique_id = nccl.get_unique_id() if comm.rank == 0 else None
        unique_id = tuple(comm.broadcast_object(None if unique_id is None else list(unique_id), "the NCCL unique id"))
        self.communicator = nccl.NcclCommunicator(comm.size, unique_id, comm.rank)
        self.types = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}

    def array(self, buffer):
        return self.cupy.asarray(buffer)   # no copy: the same device memory

    def sum(self, buffer, what):
        self._all_reduce(self.cupy.asarray(buffer), self.cupy.cuda.get_current_stream())

    def _all_reduce(self, values, stream):
        self.communicator.allReduce(values.data.ptr, values.data.ptr, values.size, self.types[values.dtype],
                                    self.nccl.NCCL_SUM, stream.ptr)

    # ---- overlapped (init(overlap=True)). NOT RUN: no GPU has run this, not even at size 1. -------------------
    # Each bucket's allReduce goes on a side stream once the compute stream has written the bucket (an event
    # recorded there), so the compute stream goes on with the next layers' backward; finish_sums makes the
    # compute stream wait for the side stream (the guard and the update read the sums). Both are stream
    # dependencies, which a CUDA graph capture takes as a fork and a join. NCCL picks its algorithm and chunking
    # by message size, so buckets may add in another order than one call over the whole buffer: every rank gets
    # the same bits, but not necessarily the one-shot path's.
    _side_stream = None
    _started = False

    def start_sum(self, buffer, start, end):
        if self._side_stream is None:
            self._side_stream = self.cupy.cuda.Stream(non_blocking=True)
        self._side_stream.wait_event(self.cupy.cuda.get_current_stream().record())
        self._all_reduce(self.cupy.asarray(buffer)[start:end], self._side_stream)
        self._started = True

    def progress(self):
        pass   # NCCL moves on by itself, on the device

    def finish_sums(self, what):
        if self._started:
            self.cupy.cuda.get_current_stream().wait_event(self._side_stream.record())
            self._started = False


TRANSPORTS = {"mpi": MpiTransport, "nccl": NcclTransport}


# ---- process setup ----------------------------------------------------------------------------------------------
def _use_local_gpu(local_rank):
    """Make GPU (local_rank modulo the GPUs here) this process's current device, before any backend touches one."""
    try:
        import cupy
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:      # no cupy, no driver, no GPU: nothing to pick
        return
    if count:
        cupy.cuda.Device(local_rank % count).use()


def _auto_backend_name():
    from .backends import get_backend
    return get_backend("auto").name


def _abort_on_uncaught_exceptions(comm):
    """An uncaught exception on one rank would leave the others waiting for it: print it under the rank's name,
    then abort the job (what `python -m mpi4py script.py` does)."""
    def hook(kind, value, tb):
        sys.stderr.write(f"gpubp: rank {comm.rank} of {comm.size} raised an uncaught exception:\n")
        sys.stderr.write("".join(traceback.format_exception(kind, value, tb)))
        comm.abort(f"{kind.__name__}: {value}")
    sys.excepthook = hook
