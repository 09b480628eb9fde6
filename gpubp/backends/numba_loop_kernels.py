"""The training loop's device-side kernels for the numba backend (issue 11): guarded SGD and Adam updates whose
settings and step count live in device memory (they check the gradients too), the loss guard, the step's
bookkeeping and the gathering of a batch from device-resident data. With them a train step never waits for the
host: no copy to or from it and no synchronisation inside a step. (numba has no CUDA graphs: each step is
launched eagerly, in stream order.)

The guard (gpubp/guard.py) is a float64 array that these kernels read and write; `flags` is the backend's small
int64 scratch array, laid out below. Between two ops every index slot of `flags` holds NO_INDEX and TICKETS 0:
each kernel that sets one puts it back.

Commit in the last block. An op that must look at a whole buffer before deciding (is any gradient non-finite?
would any updated value be?) is one launch: every thread writes what it found into `flags` with an atomic
(atomic min of a flat index: the smallest bad index, whatever the order the blocks run in, so the result is
deterministic), fences, and the block takes a ticket; the block that takes the last ticket has seen every other
block's findings and commits them into the guard (the CUDA threadFenceReduction pattern). That saves the
separate one-thread commit launch a two-kernel design would need (a numba launch from Python costs tens of
microseconds of host time). An update is two launches of the same kernel: phase 0 checks the gradients,
computes the new values and writes nothing but the findings (its last block commits: a fault, or the step
counted), phase 1 recomputes the same values and stores them unless the guard holds a fault. The only atomics
are integer min, add and exchange: their results do not depend on the order the blocks run in, so every op here
gives the same bits run to run (deterministic=True needs nothing more).

Every kernel runs on a real GPU and under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1), where blocks run one at a
time; there the grids are kept small (LOOP_THREADS, LOOP_MAX_BLOCKS) but have several blocks, so the last-block
commit is exercised. No kernel calls a device function (they compile with plain numba.cuda.compile_ptx, no GPU
needed): launch_table() lists every kernel with the argument types the backend launches it with.
"""
import collections
import functools
import math

import numba
import numpy as np
from numba import cuda

from .. import guard as G
from .. import loss_scale as S
from .. import losses

SIMULATOR = bool(cuda.config.ENABLE_CUDASIM)

FAULT, FAULT_STEP, FAULT_INDEX, SKIPPED, STEP = G.FAULT, G.FAULT_STEP, G.FAULT_INDEX, G.SKIPPED, G.STEP
LOSS_SUM, CORRECT, ROWS, RING, RING_SIZE = G.LOSS_SUM, G.CORRECT, G.ROWS, G.RING, G.RING_SIZE
LOSS_FAULT, GRADIENT_FAULT, PARAMS_FAULT, STATE_FAULT = G.LOSS, G.GRADIENT, G.PARAMS, G.STATE
OVERFLOW_FAULT, NO_FAULT = G.OVERFLOW, G.NONE
SCALE, GOOD, OVERFLOWS, GROWTH_INTERVAL, GROWTH, BACKOFF = (S.SCALE, S.GOOD, S.OVERFLOWS, S.GROWTH_INTERVAL,
                                                            S.GROWTH, S.BACKOFF)
MAX_SCALE = S.MAX_SCALE
BCE, SOFTMAX_CE = losses.BCE, losses.SOFTMAX_CE

# ---- the scratch `flags` (int64, FLAGS_SIZE) ---------------------------------------------------------------
NO_INDEX = 2 ** 62        # "no bad element found" (larger than any flat index)
BAD_PARAMS = 0            # smallest flat index whose updated parameter would be non-finite
BAD_STATE = 1             # BAD_STATE + k: the same for optimizer state buffer k (k = 0, 1)
BAD_GRADIENT = 3          # smallest flat index of a non-finite gradient (the update's, or an unscaled one)
STEP_DONE = 4             # the optimizer's step count an update computed with (phase 0 keeps it for phase 1)
TICKETS = 5               # blocks of the current launch that have finished; the last one commits
CORRECT_COUNT = 6         # record_step: correct predictions counted so far by the launch's blocks
FLAGS_SIZE = 8
INDEX_SLOTS = (BAD_PARAMS, BAD_STATE, BAD_STATE + 1, BAD_GRADIENT)

SGD, ADAM = 0, 1          # update_kernel's `rule`

# Launch shape of every kernel here: 1-D blocks of LOOP_THREADS, at most LOOP_MAX_BLOCKS blocks, grid-stride.
# Under the simulator (one OS thread per CUDA thread, about a millisecond each, one block at a time) two tiny
# blocks: few threads, but the multi-block paths (atomics, tickets, the last block's commit) run there too.
LOOP_THREADS = 8 if SIMULATOR else 256
LOOP_MAX_BLOCKS = 2 if SIMULATOR else 1024


def loop_blocks(work):
    """Blocks for `work` grid-stride iterations: enough to cover it, at most LOOP_MAX_BLOCKS, at least one."""
    return max(1, min(LOOP_MAX_BLOCKS, -(-int(work) // LOOP_THREADS)))


def _mul_rn(a, b):
    return a * b


# a·b rounded once, never contracted with a following add into an FMA (NVVM contracts by default), so the
# guard's float64 sums come out bit for bit as numpy's `sum += a * b`. The simulator's libdevice functions are
# stubs: there the plain product (Python has no FMA contraction).
mul_rn = _mul_rn if SIMULATOR else cuda.libdevice.dmul_rn


# ---- arrays -------------------------------------------------------------------------------------------------
@cuda.jit
def fill_kernel(x, value):
    """x[i] = value for the flat array x (a device-side zeros(): no host array uploaded).
    Launch: 1-D grid-stride over x.size (loop_blocks). Traffic: x written once."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, x.size, stride):
        x[i] = value


@cuda.jit
def flags_init_kernel(flags):
    """flags as ops leave it: NO_INDEX in every index slot, 0 elsewhere. Launch: grid 1, block 1."""
    if cuda.grid(1) == 0:
        for i in range(flags.size):
            flags[i] = 0
        for slot in INDEX_SLOTS:
            flags[slot] = NO_INDEX


# ---- a batch from device-resident data ------------------------------------------------------------------------
@cuda.jit
def gather_rows_kernel(src, order, cursor, out):
    """out[i, :] = src[order[cursor[0] + i], :]; src (M, F), order (M + 1,) int64, cursor (1,) int64 (a view of
    order's last entry in fit), out (n, F). The caller keeps cursor[0] + n <= M. Launch: 1-D grid-stride over
    n·F (loop_blocks). Traffic: n·F elements of src read, out written once; order's n entries read F times
    (from cache)."""
    first = cursor[0]
    F = out.shape[1]
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for e in range(start, out.size, stride):
        i, j = e // F, e % F
        out[i, j] = src[order[first + i], j]


@cuda.jit
def advance_cursor_kernel(cursor, n):
    """cursor[0] += n, after the gathers of a batch have read it. Launch: grid 1, block 1."""
    if cuda.grid(1) == 0:
        cursor[0] += n


# ---- the loss guard -------------------------------------------------------------------------------------------
@cuda.jit
def guard_loss_kernel(loss_out, guard):
    """If guard[FAULT] is set: guard[SKIPPED] += 1. Else a non-finite loss_out[0] sets FAULT = LOSS,
    FAULT_INDEX = -1, FAULT_STEP = guard[STEP] (gpubp/guard.py). The gradients are checked by the update
    (update_kernel's phase 0), where each is read anyway. loss_out (1,) in the model's dtype.
    Launch: grid 1, block 1. Traffic: a few scalars."""
    if cuda.grid(1) != 0:
        return
    if guard[FAULT] != 0:
        guard[SKIPPED] += 1
    elif not math.isfinite(loss_out[0]):
        guard[FAULT] = LOSS_FAULT
        guard[FAULT_STEP] = guard[STEP]
        guard[FAULT_INDEX] = -1


# ---- fp16 dynamic loss scaling (gpubp/loss_scale.py) ----------------------------------------------------------
@cuda.jit
def unscale_gradients_kernel(loss_out, grads, scaler, guard, flags):
    """guard_loss for a loss-scaled step. If guard[FAULT] is set: guard[SKIPPED] += 1 and nothing else. Else
    a non-finite loss_out[0] sets FAULT = LOSS, FAULT_INDEX = -1 (a real fault; the gradients are left alone);
    else every gradient is unscaled in place, grads[i] = grads[i] · float32(1/S), a float32 product (the
    numpy backend's `grads *= float32(1 / S)`; exact for a power-of-two S short of float32's subnormals), and a
    non-finite result (the scaled δ overflowed) sets FAULT = OVERFLOW, FAULT_INDEX = its smallest flat index;
    FAULT_STEP = guard[STEP] with either. The update then skips the step; update_scale clears OVERFLOW.
    loss_out (1,) and grads (P,) flat float32 (fp16 models are float32), scaler (loss_scale.SIZE,) float64.
    Launch: 1-D grid-stride over P
    (loop_blocks); each thread unscales all its elements, keeps its first non-finite one and atomic-mins it
    into flags[BAD_GRADIENT]; the last block to finish commits. Traffic: grads read and written once (not
    touched after a fault or with a non-finite loss), S read once per thread."""
    if guard[FAULT] != 0:
        if cuda.grid(1) == 0:
            guard[SKIPPED] += 1
        return
    loss_finite = math.isfinite(loss_out[0])
    if loss_finite:
        inverse = np.float32(1.0 / scaler[SCALE])
        bad = NO_INDEX
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, grads.size, stride):
            grads[i] = grads[i] * inverse
            if bad == NO_INDEX and not math.isfinite(grads[i]):   # the stored value: overflow to inf counts
                bad = i
        if bad != NO_INDEX:
            cuda.atomic.min(flags, BAD_GRADIENT, bad)
    cuda.threadfence()
    cuda.syncthreads()
    if cuda.threadIdx.x == 0 and cuda.atomic.add(flags, TICKETS, 1) == cuda.gridDim.x - 1:
        bad = cuda.atomic.exch(flags, BAD_GRADIENT, NO_INDEX)
        flags[TICKETS] = 0
        if not loss_finite:
            guard[FAULT] = LOSS_FAULT
            guard[FAULT_STEP] = guard[STEP]
            guard[FAULT_INDEX] = -1
        elif bad != NO_INDEX:
            guard[FAULT] = OVERFLOW_FAULT
            guard[FAULT_STEP] = guard[STEP]
            guard[FAULT_INDEX] = bad


@cuda.jit
def update_scale_kernel(scaler, guard):
    """The loss scaler's rule (gpubp/loss_scale.update), after the update, before record_step:
        guard[FAULT] == OVERFLOW: FAULT = NONE, FAULT_STEP = 0, FAULT_INDEX = -1 and guard[STEP] += 1 (the step
                                  is taken, its update skipped: record_step then records its loss);
                                  S = S·BACKOFF, GOOD = 0, OVERFLOWS += 1
        guard[FAULT] == NONE:     GOOD += 1; when GOOD reaches GROWTH_INTERVAL: S = min(S·GROWTH, MAX_SCALE),
                                  GOOD = 0
        any other fault:          nothing (the host reports it)
    scaler (loss_scale.SIZE,) and guard float64. Launch: grid 1, block 1. Traffic: a few scalars."""
    if cuda.grid(1) != 0:
        return
    fault = guard[FAULT]
    if fault == OVERFLOW_FAULT:
        guard[FAULT] = NO_FAULT
        guard[FAULT_STEP] = 0
        guard[FAULT_INDEX] = -1
        guard[STEP] += 1
        scaler[SCALE] = scaler[SCALE] * scaler[BACKOFF]
        scaler[GOOD] = 0
        scaler[OVERFLOWS] += 1
    elif fault == NO_FAULT:
        scaler[GOOD] += 1
        if scaler[GOOD] >= scaler[GROWTH_INTERVAL]:
            scaler[SCALE] = min(scaler[SCALE] * scaler[GROWTH], MAX_SCALE)
            scaler[GOOD] = 0


# ---- the guarded updates -----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def update_kernel_for(dtype_name):
    """The guarded update kernel for one dtype ("float32"/"float64"): the settings are read from `hyper`
    (float64) and rounded to the dtype once, so the arithmetic runs in the parameters' dtype, as numpy's does
    (a float64 scalar would promote every float32 product)."""
    cast = np.dtype(dtype_name).type

    @cuda.jit
    def update_kernel(rule, params, grads, state0, state1, step, hyper, guard, flags, phase):
        """One guarded optimizer step over the flat buffers (P,), in place; `rule` SGD or ADAM; step (1,) int64
        (steps done); hyper float64 in Backend.SGD_HYPER / ADAM_HYPER order. t = steps done + 1.
            SGD   state0 = b (momentum buffer; state1 unused):  g = ∇ + wd·θ
                  with μ ≠ 0: b = g (t = 1) or μ·b + (1 − dampening)·g;  g = g + μ·b (Nesterov) or b
                  θ = θ − lr·g
            ADAM  state0 = m, state1 = v:  g = ∇ + wd·θ;  m = β1·m + (1 − β1)·g;  v = β2·v + (1 − β2)·g²
                  θ = θ − (lr/(1 − β1ᵗ)) · m / (√v/√(1 − β2ᵗ) + ε)
        Every thread returns at once when guard[FAULT] is set (a faulted step: nothing is done).
        phase 0: checks the gradients and computes the new θ and state, and writes none of them: the smallest
            flat index of a non-finite gradient ∇ (as given, before weight decay) is atomic-minned into
            flags[BAD_GRADIENT], and per buffer (θ, state 0, state 1) that of a non-finite new value into
            flags[BAD_PARAMS + k]. The last block to finish commits: the first slot with a bad index (the
            gradient, then θ, then the state, as numpy names them) sets FAULT = GRADIENT / PARAMS / STATE + k,
            FAULT_STEP = guard[STEP], FAULT_INDEX; else the step counts: flags[STEP_DONE] = step[0], then step[0]
            and guard[STEP] += 1. The step's only gradient check: ∇ is read here anyway, no pass of its own.
        phase 1 (launched next, same grid): recomputes the same values from the same inputs, with the step count
            kept in flags[STEP_DONE], and stores them.
        Launch: 1-D grid-stride over P (loop_blocks), twice. Traffic, per element: phase 0 reads θ, ∇ and the
        state the rule uses; phase 1 reads them again and writes θ and that state (SGD with momentum: 3 + 5
        element accesses, against 5 for an unguarded update; no copy of any buffer is kept). The gradient check
        adds none."""
        if guard[FAULT] != 0:
            return
        done = step[0] if phase == 0 else flags[STEP_DONE]
        t = done + 1
        wd64 = hyper[4] if rule == ADAM else hyper[3]
        use_wd = wd64 != 0
        wd = cast(wd64)
        use_momentum = rule == SGD and hyper[1] != 0
        nesterov = rule == SGD and hyper[4] != 0
        if rule == SGD:
            lr, c0, c1 = cast(hyper[0]), cast(hyper[1]), cast(1.0 - hyper[2])        # lr, μ, 1 − dampening
            c2, c3, c4, c5 = cast(0), cast(0), cast(0), cast(0)
        else:
            lr = cast(hyper[0] / (1.0 - hyper[1] ** t))                            # lr / (1 − β1ᵗ)
            c0, c1 = cast(hyper[1]), cast(1.0 - hyper[1])                           # β1, 1 − β1
            c2, c3 = cast(hyper[2]), cast(1.0 - hyper[2])                           # β2, 1 − β2
            c4, c5 = cast(math.sqrt(1.0 - hyper[2] ** t)), cast(hyper[3])           # √(1 − β2ᵗ), ε
        writes0 = use_momentum or rule == ADAM
        writes1 = rule == ADAM
        bad_g, bad0, bad1, bad2 = NO_INDEX, NO_INDEX, NO_INDEX, NO_INDEX
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, params.size, stride):
            grad = grads[i]
            g = grad
            if use_wd:
                g = params[i] * wd + g
            s0 = g
            s1 = g
            if rule == SGD:
                if use_momentum:
                    s0 = g if t == 1 else state0[i] * c0 + g * c1
                    g = g + s0 * c0 if nesterov else s0
                theta = params[i] - g * lr
            else:
                s0 = state0[i] * c0 + g * c1
                s1 = state1[i] * c2 + (g * c3) * g
                theta = params[i] - (s0 / (math.sqrt(s1) / c4 + c5)) * lr
            if phase == 0:
                if bad_g == NO_INDEX and not math.isfinite(grad):   # the raw ∇: a g + wd·θ overflow is θ's
                    bad_g = i
                if bad0 == NO_INDEX and not math.isfinite(theta):
                    bad0 = i
                if writes0 and bad1 == NO_INDEX and not math.isfinite(s0):
                    bad1 = i
                if writes1 and bad2 == NO_INDEX and not math.isfinite(s1):
                    bad2 = i
            else:
                params[i] = theta
                if writes0:
                    state0[i] = s0
                if writes1:
                    state1[i] = s1
        if phase != 0:
            return
        if bad_g != NO_INDEX:
            cuda.atomic.min(flags, BAD_GRADIENT, bad_g)
        if bad0 != NO_INDEX:
            cuda.atomic.min(flags, BAD_PARAMS, bad0)
        if bad1 != NO_INDEX:
            cuda.atomic.min(flags, BAD_STATE, bad1)
        if bad2 != NO_INDEX:
            cuda.atomic.min(flags, BAD_STATE + 1, bad2)
        cuda.threadfence()
        cuda.syncthreads()
        if cuda.threadIdx.x == 0 and cuda.atomic.add(flags, TICKETS, 1) == cuda.gridDim.x - 1:
            # the last block: every block has read step[0] and reported; commit
            bad_g = cuda.atomic.exch(flags, BAD_GRADIENT, NO_INDEX)
            bad0 = cuda.atomic.exch(flags, BAD_PARAMS, NO_INDEX)
            bad1 = cuda.atomic.exch(flags, BAD_STATE, NO_INDEX)
            bad2 = cuda.atomic.exch(flags, BAD_STATE + 1, NO_INDEX)
            flags[TICKETS] = 0
            code, index = 0, NO_INDEX
            if bad_g != NO_INDEX:
                code, index = GRADIENT_FAULT, bad_g
            elif bad0 != NO_INDEX:
                code, index = PARAMS_FAULT, bad0
            elif bad1 != NO_INDEX:
                code, index = STATE_FAULT, bad1
            elif bad2 != NO_INDEX:
                code, index = STATE_FAULT + 1, bad2
            if code != 0:
                guard[FAULT] = code
                guard[FAULT_STEP] = guard[STEP]
                guard[FAULT_INDEX] = index
            else:
                flags[STEP_DONE] = done
                step[0] = done + 1
                guard[STEP] += 1

    return update_kernel


# ---- the step's bookkeeping ----------------------------------------------------------------------------------------
@cuda.jit
def record_step_kernel(loss, loss_out, A, Y, guard, flags):
    """After a good step (guard[FAULT] not set; else nothing), with n = A.shape[0]:
        guard[LOSS_SUM] += float64(loss_out[0])·n;  guard[ROWS] += n;  guard[RING + (guard[STEP] − 1) % RING_SIZE]
        = loss_out[0];  guard[CORRECT] += (count / compared)·n
    count and compared as gpubp.losses.accuracy counts them (the same float64 operations, so the sums are numpy's
    bit for bit): bce compares every element, (A > 0.5) == (Y > 0.5), compared = n·C; softmax_ce compares each
    row's arg-max (the first of ties; a NaN counts as the largest, as numpy's argmax), compared = n; mse counts
    nothing and leaves CORRECT alone. A, Y (n, C) in the model's dtype, loss_out (1,).
    Launch: 1-D grid-stride over n·C (bce) or n rows (softmax_ce), loop_blocks of LOOP_THREADS: per-thread
    counts, a shared-memory tree per block, one integer atomic add per block into flags[CORRECT_COUNT] (integer
    sums: exact in any order); the last block to finish commits. Traffic: A and Y read once."""
    if guard[FAULT] != 0:
        return
    partial = cuda.shared.array(LOOP_THREADS, numba.int64)
    tid = cuda.threadIdx.x
    n, C = A.shape[0], A.shape[1]
    start, stride = cuda.grid(1), cuda.gridsize(1)
    count = 0
    if loss == BCE:
        for e in range(start, n * C, stride):
            r, j = e // C, e % C
            if (A[r, j] > 0.5) == (Y[r, j] > 0.5):
                count += 1
    elif loss == SOFTMAX_CE:
        for r in range(start, n, stride):
            best_a, best_y = 0, 0
            for j in range(1, C):
                a, top = A[r, j], A[r, best_a]
                if not math.isnan(top) and (math.isnan(a) or a > top):
                    best_a = j
                if Y[r, j] > Y[r, best_y]:
                    best_y = j
            if best_a == best_y:
                count += 1
    partial[tid] = count
    cuda.syncthreads()
    width = LOOP_THREADS // 2
    while width > 0:
        if tid < width:
            partial[tid] += partial[tid + width]
        cuda.syncthreads()
        width //= 2
    if tid == 0:
        if partial[0] != 0:
            cuda.atomic.add(flags, CORRECT_COUNT, partial[0])
        cuda.threadfence()
        if cuda.atomic.add(flags, TICKETS, 1) == cuda.gridDim.x - 1:
            total = cuda.atomic.exch(flags, CORRECT_COUNT, 0)
            flags[TICKETS] = 0
            rows = np.float64(n)
            value = np.float64(loss_out[0])
            guard[LOSS_SUM] = guard[LOSS_SUM] + mul_rn(value, rows)
            guard[ROWS] = guard[ROWS] + rows
            guard[RING + (np.int64(guard[STEP]) - 1) % RING_SIZE] = value
            if loss == BCE or loss == SOFTMAX_CE:
                compared = n * C if loss == BCE else n
                accuracy = np.float64(total) / np.float64(compared)
                guard[CORRECT] = guard[CORRECT] + mul_rn(accuracy, rows)


# ---- the launch table ------------------------------------------------------------------------------------------------
KERNEL_DTYPES = ("float32", "float64")
KernelLaunch = collections.namedtuple("KernelLaunch", "name dtype kernel argtypes")


def all_kernels():
    """{(kernel name, dtype or None): dispatcher} for every kernel of this module, found by looking at the module
    and at each dtype's update_kernel_for: what launch_table() must cover."""
    found = {(value.py_func.__name__, None): value for value in globals().values()
             if hasattr(value, "py_func") and hasattr(value, "targetoptions")
             and not value.targetoptions.get("device")}
    for dtype_name in KERNEL_DTYPES:
        kernel = update_kernel_for(dtype_name)
        found[(kernel.py_func.__name__, dtype_name)] = kernel
    return found


def launch_table():
    """One KernelLaunch(name, dtype, kernel, argtypes) per kernel and array dtype it is launched with, the numba
    types being those of what numba_backend.py passes (a Python int is int64, a float float64; every array is
    C-contiguous): what a GPU launch compiles, and what tests/test_numba_loop_compile.py compiles for sm_90 and
    sm_80 with numba.cuda.compile_ptx, no GPU needed. The same record as numba_kernels' table, so the two lists
    can be joined."""
    i64, f64 = numba.int64, numba.float64
    ivec, gvec = i64[::1], f64[::1]       # int64 step/order/flags, float64 guard/hyper
    table = []
    for dtype_name in KERNEL_DTYPES:
        dt = numba.from_dtype(np.dtype(dtype_name))
        mat, vec = dt[:, ::1], dt[::1]
        for kernel, argtypes in (
                # x (flat), value: zeros() of a float buffer
                (fill_kernel, (vec, i64)),
                # src, order, cursor, out
                (gather_rows_kernel, (mat, ivec, ivec, mat)),
                # loss_out, guard
                (guard_loss_kernel, (vec, gvec)),
                # rule, params, grads, state0, state1, step, hyper, guard, flags, phase
                (update_kernel_for(dtype_name), (i64, vec, vec, vec, vec, ivec, gvec, gvec, ivec, i64)),
                # loss, loss_out, A, Y, guard, flags
                (record_step_kernel, (i64, vec, mat, mat, gvec, ivec))):
            table.append(KernelLaunch(kernel.py_func.__name__, dtype_name, kernel, argtypes))
    # the fp16 loss scaler's (float32 models only): loss_out, grads, scaler, guard, flags; scaler, guard
    table.append(KernelLaunch("unscale_gradients_kernel", "float32", unscale_gradients_kernel,
                              (numba.float32[::1], numba.float32[::1], gvec, gvec, ivec)))
    table.append(KernelLaunch("update_scale_kernel", "float32", update_scale_kernel, (gvec, gvec)))
    # zeros() of a 16-bit storage buffer (hidden A and δ of bf16/fp16: backends.base.Backend.storage_dtype)
    for dt in (numba.types.float16, numba.uint16):
        table.append(KernelLaunch("fill_kernel", str(dt), fill_kernel, (dt[::1], i64)))
    # dtype-free kernels, and zeros() of an int64 buffer (the optimizer's step count)
    table.append(KernelLaunch("fill_kernel", "int64", fill_kernel, (ivec, i64)))
    table.append(KernelLaunch("flags_init_kernel", "int64", flags_init_kernel, (ivec,)))
    table.append(KernelLaunch("advance_cursor_kernel", "int64", advance_cursor_kernel, (ivec, i64)))
    return table
