"""The kernel set of SPEC section 3 written with numba.cuda.jit: the same math as kernels/*.cu, in Python.

Shapes (row-major, rows are samples): A_prev (N, in), W (out, in), b (out,), Z, A, δ (N, out).

Every kernel runs on a real GPU and, slowly, on the CPU under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1):
so no warp intrinsics, and each cuda.shared.array on its own line. No kernel uses atomics: every reduction
is summed in a fixed order, so every op is bit-identical run to run (deterministic mode needs nothing more).
"""
import collections
import functools
import math
import types

import numba
import numpy as np
from numba import cuda

from .. import activations as acts
from .. import losses

IDENTITY, RELU, LEAKY_RELU, SIGMOID, TANH = acts.IDENTITY, acts.RELU, acts.LEAKY_RELU, acts.SIGMOID, acts.TANH
MSE, BCE, SOFTMAX_CE = losses.MSE, losses.BCE, losses.SOFTMAX_CE

# GEMM tile: a block computes a BM x BN tile of C with (BM/TM)·(BN/TN) threads, each a TM x TN register tile;
# K is walked BK at a time through shared memory. On a GPU: 32x32x16 tiles, 4x4 per thread, 64 threads. Under
# the simulator, whose cost is per simulated thread (one OS thread each, polled at every syncthreads), the same
# code runs 16x16x8 tiles with 16 threads: the test matrices (1 to 33 wide) still cross tile edges.
GPU_TILE = (32, 32, 16, 4, 4)          # BM, BN, BK, TM, TN
SIMULATOR_TILE = (16, 16, 8, 4, 4)
BM, BN, BK, TM, TN = SIMULATOR_TILE if cuda.config.ENABLE_CUDASIM else GPU_TILE
GEMM_THREADS = (BN // TN, BM // TM)          # (x along n, y along m)
REDUCE_THREADS = 32 if cuda.config.ENABLE_CUDASIM else 128   # the one-block reductions (loss sum)


# ---- activations: A = g(Z) and g'(Z) ----------------------------------------------------------------------
@cuda.jit(device=True)
def activation_forward(act, z, alpha):
    if act == RELU:
        return z if z > 0 else z * 0
    if act == LEAKY_RELU:
        return z if z > 0 else z * alpha
    if act == SIGMOID:
        # two branches so that exp never overflows (the simulator's math.exp would raise)
        if z >= 0:
            return 1 / (1 + math.exp(-z))
        e = math.exp(z)
        return e / (1 + e)
    if act == TANH:
        return math.tanh(z)
    return z


@cuda.jit(device=True)
def activation_derivative(act, z, a, alpha):
    """g'(Z). NOTE: relu's mask is taken from Z, not A, so the gradient at Z = 0 is 0, as in the seed."""
    if act == RELU:
        return 1.0 if z > 0 else 0.0
    if act == LEAKY_RELU:
        return 1.0 if z > 0 else alpha
    if act == SIGMOID:
        return a * (1 - a)
    if act == TANH:
        return 1 - a * a
    return 1.0


# ---- the tiled GEMM core ---------------------------------------------------------------------------------
@cuda.jit(device=True)
def gemm_tile(Aop, a_kcontig, Bop, b_kcontig, M, N, K, acc, As, Bs):
    """acc[i, j] = Σ_k A(m, k)·B(k, n) for this thread's TM x TN outputs of the block's BM x BN tile, where
        A(m, k) = Aop[m, k] if a_kcontig else Aop[k, m]      B(k, n) = Bop[n, k] if b_kcontig else Bop[k, n]
    so Z = A_prev·Wᵀ, dA = δ·W and dW = δᵀ·A_prev all read their operands in place, untransposed.
    Block (bx, by) computes rows m0 = bx·BM … and columns n0 = by·BN … of C (M, N): the rows of C, which are
    the batch in the forward and input-gradient GEMMs, walk grid.x (up to 2³¹ − 1 blocks), not grid.y (65535).
    Thread (tx, ty) owns rows m0 + ty + i·(BM/TM) and columns n0 + tx + j·(BN/TN): strided, so that the
    threads of a warp read neighbouring shared-memory words. Outside the matrix, tiles are zero-filled and the
    FMAs need no bounds checks."""
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    tid = ty * GEMM_THREADS[0] + tx
    m0, n0 = tile_origin()
    for i in range(TM):
        for j in range(TN):
            acc[i, j] = 0
    for k0 in range(0, K, BK):
        # each of the 64 threads stores BM·BK/64 elements of each operand's slice into shared memory
        for e in range(tid, BM * BK, GEMM_THREADS[0] * GEMM_THREADS[1]):
            kk, mm = e // BM, e % BM
            m, k = m0 + mm, k0 + kk
            if m < M and k < K:
                As[kk, mm] = Aop[m, k] if a_kcontig else Aop[k, m]
            else:
                As[kk, mm] = 0
        for e in range(tid, BN * BK, GEMM_THREADS[0] * GEMM_THREADS[1]):
            kk, nn = e // BN, e % BN
            n, k = n0 + nn, k0 + kk
            if n < N and k < K:
                Bs[kk, nn] = Bop[n, k] if b_kcontig else Bop[k, n]
            else:
                Bs[kk, nn] = 0
        cuda.syncthreads()
        for kk in range(BK):
            for i in range(TM):
                a = As[kk, ty + i * (BM // TM)]
                for j in range(TN):
                    acc[i, j] += a * Bs[kk, tx + j * (BN // TN)]
        cuda.syncthreads()


@cuda.jit(device=True)
def tile_origin():
    """(m0, n0): the first row and column of C in this block's tile. Rows on blockIdx.x (see gemm_grid in
    numba_backend.py). int64: blockIdx and threadIdx are int32 in numba, and a row index passes 2³¹ − 1 on a batch
    of more than 2³¹ rows (grid.x allows 2³¹ − 1 blocks of BM rows)."""
    return numba.int64(cuda.blockIdx.x) * BM, numba.int64(cuda.blockIdx.y) * BN


@cuda.jit(device=True)
def output_position(i, j):
    """The element (m, n) of C that this thread holds in acc[i, j] after gemm_tile."""
    m0, n0 = tile_origin()
    return m0 + cuda.threadIdx.y + i * (BM // TM), n0 + cuda.threadIdx.x + j * (BN // TN)


@functools.lru_cache(maxsize=None)
def kernels_for(dtype_name):
    """The kernels that keep tiles in shared and local memory, compiled for one dtype ("float32"/"float64"):
    cuda.shared.array and cuda.local.array need their element type at compile time, so each dtype gets its
    own set, built once (a closure over `dt`). Returns a namespace of the four kernels."""
    dt = numba.from_dtype(np.dtype(dtype_name))

    @cuda.jit
    def dense_forward_kernel(A_prev, W, b, has_bias, act, alpha, Z, A):
        """Z = A_prev · Wᵀ + b, A = g(Z); A_prev (N, in), W (out, in), b (out,), Z and A (N, out).
        Launch: grid gemm_grid(N, out) = (ceil(N/BM), ceil(out/BN)), batch rows on x; block GEMM_THREADS.
        Traffic: A_prev read ceil(out/BN) times, W ceil(N/BM) times, b once per tile; Z and A written once."""
        As = cuda.shared.array((BK, BM), dt)
        Bs = cuda.shared.array((BK, BN), dt)
        acc = cuda.local.array((TM, TN), dt)
        M, N, K = A_prev.shape[0], W.shape[0], A_prev.shape[1]
        gemm_tile(A_prev, True, W, True, M, N, K, acc, As, Bs)
        for i in range(TM):
            for j in range(TN):
                m, n = output_position(i, j)
                if m < M and n < N:
                    z = acc[i, j] + b[n] if has_bias else acc[i, j]
                    Z[m, n] = z
                    A[m, n] = activation_forward(act, z, alpha)

    @cuda.jit
    def input_grad_kernel(delta, W, masked, Z_prev, A_prev, act, alpha, out):
        """dA_prev = δ · W, or with `masked` δ_prev = (δ · W) ⊙ g'(Z_prev) (the previous layer's mask as the
        epilogue); δ (N, out), W (out, in), Z_prev, A_prev and out (N, in). Launch: grid gemm_grid(N, in) =
        (ceil(N/BM), ceil(in/BN)), batch rows on x; block GEMM_THREADS. Traffic: δ read ceil(in/BN) times,
        W ceil(N/BM) times; out written once, Z_prev and A_prev read once when masked (else never)."""
        As = cuda.shared.array((BK, BM), dt)
        Bs = cuda.shared.array((BK, BN), dt)
        acc = cuda.local.array((TM, TN), dt)
        M, N, K = delta.shape[0], W.shape[1], delta.shape[1]
        gemm_tile(delta, True, W, False, M, N, K, acc, As, Bs)
        for i in range(TM):
            for j in range(TN):
                m, n = output_position(i, j)
                if m < M and n < N:
                    if masked:
                        out[m, n] = acc[i, j] * activation_derivative(act, Z_prev[m, n], A_prev[m, n], alpha)
                    else:
                        out[m, n] = acc[i, j]

    @cuda.jit
    def weight_grad_kernel(delta, A_prev, accumulate, dW):
        """dW (=|+=) δᵀ · A_prev = Σₙ δₙ aₙᵀ, the seed's outer products summed over the batch in a fixed order;
        δ (N, out), A_prev (N, in), dW (out, in). Launch: grid gemm_grid(out, in) = (ceil(out/BM), ceil(in/BN)),
        block GEMM_THREADS: the batch is K here, walked inside each block, so the grid does not grow with N.
        Traffic: δ read ceil(in/BN) times, A_prev ceil(out/BM) times; dW read (when accumulating) and written
        once."""
        As = cuda.shared.array((BK, BM), dt)
        Bs = cuda.shared.array((BK, BN), dt)
        acc = cuda.local.array((TM, TN), dt)
        M, N, K = dW.shape[0], dW.shape[1], delta.shape[0]
        gemm_tile(delta, False, A_prev, False, M, N, K, acc, As, Bs)
        for i in range(TM):
            for j in range(TN):
                m, n = output_position(i, j)
                if m < M and n < N:
                    if accumulate:
                        dW[m, n] += acc[i, j]
                    else:
                        dW[m, n] = acc[i, j]

    @cuda.jit
    def sum_kernel(values, scale, out):
        """out[0] = scale · Σ values, by ONE block of REDUCE_THREADS: strided partial sums, then a shared-memory
        tree, always in the same order (deterministic, no atomics). Launch: grid 1, block REDUCE_THREADS.
        Traffic: values (N,) read once, one element written."""
        partial = cuda.shared.array(REDUCE_THREADS, dt)
        t = cuda.threadIdx.x
        s = values[0] * 0
        for i in range(t, values.shape[0], REDUCE_THREADS):
            s += values[i]
        partial[t] = s
        cuda.syncthreads()
        width = REDUCE_THREADS // 2
        while width > 0:
            if t < width:
                partial[t] += partial[t + width]
            cuda.syncthreads()
            width //= 2
        if t == 0:
            out[0] = partial[0] * scale

    return types.SimpleNamespace(dense_forward=dense_forward_kernel, input_grad=input_grad_kernel,
                                 weight_grad=weight_grad_kernel, sum=sum_kernel)


@cuda.jit
def bias_grad_kernel(delta, accumulate, db):
    """db (=|+=) Σₙ δₙ; δ (N, out), db (out,): one thread per output column, summing rows in order (no atomics).
    Launch: 1-D grid-stride over out (grid_stride_blocks(out)). Traffic: δ read once, db written once."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for j in range(start, db.shape[0], stride):
        s = delta[0, j] * 0
        for n in range(delta.shape[0]):
            s += delta[n, j]
        if accumulate:
            db[j] += s
        else:
            db[j] = s


# ---- elementwise ------------------------------------------------------------------------------------------
@cuda.jit
def activation_mask_kernel(dA, Z, A, act, alpha, delta):
    """δ = dA ⊙ g'(Z) over the flattened (N, out) arrays (δ may be dA). Launch: 1-D grid-stride over N·out
    (grid_stride_blocks). Traffic: dA, Z and A read once, δ written once."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for e in range(start, delta.size, stride):
        n, j = e // delta.shape[1], e % delta.shape[1]
        delta[n, j] = dA[n, j] * activation_derivative(act, Z[n, j], A[n, j], alpha)


@cuda.jit
def nonfinite_flag_kernel(x, flag):
    """flag[0] = 1 where any element of the flat array x is NaN or inf (every writer writes the same 1).
    Launch: 1-D grid-stride over x.size. Traffic: x read once."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, x.size, stride):
        if math.isnan(x[i]) or math.isinf(x[i]):
            flag[0] = 1


@cuda.jit
def one_hot_kernel(labels, out):
    """out[n, :] = 0, out[n, labels[n]] = 1; labels (N,) int64, out (N, classes); a label outside [0, classes)
    gives a row of NaN (device labels of a sync=False step are not read back: the step's guard reports it).
    Launch: 1-D grid-stride over the N rows. Traffic: labels read once, out written once."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for n in range(start, out.shape[0], stride):
        label = labels[n]
        bad = label < 0 or label >= out.shape[1]
        for j in range(out.shape[1]):
            out[n, j] = math.nan if bad else (1 if label == j else 0)


# ---- fused output activation + loss + ∂L/∂Z ---------------------------------------------------------------
@cuda.jit
def loss_rows_kernel(loss, act, alpha, Z, Y, A, delta, row_loss):
    """Per row n (one thread each, grid-stride): A = F(Z), δ = ∂L/∂Z and row_loss[n], such that L is
    Σₙ row_loss[n] / N (summed afterwards by sum_kernel, in a fixed order):
        MSE        row_loss = ½‖F(z) − y‖²            δ = (A − y)/N ⊙ F'(Z)
        BCE        row_loss = mean over outputs of max(z, 0) − z·y + log(1 + e^−|z|)     δ = (σ(z) − y)/(N·out)
        SOFTMAX_CE row_loss = −Σₖ yₖ log softmax(z)ₖ  δ = (softmax(z) − y)/N
    Z, Y, A, δ (N, out), row_loss (N,). Launch: 1-D grid-stride over the N rows. Traffic: Z and Y read once
    (softmax reads Z three times, from cache), A and δ written once."""
    N, out = Z.shape[0], Z.shape[1]
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for n in range(start, N, stride):
        total = 0.0
        if loss == MSE:
            for k in range(out):
                z = Z[n, k]
                a = activation_forward(act, z, alpha)
                A[n, k] = a
                d = a - Y[n, k]
                total += d * d
                delta[n, k] = d / N * activation_derivative(act, z, a, alpha)
            row_loss[n] = 0.5 * total
        elif loss == BCE:
            for k in range(out):
                z = Z[n, k]
                y = Y[n, k]
                a = activation_forward(SIGMOID, z, alpha)
                A[n, k] = a
                total += max(z, 0) - z * y + math.log1p(math.exp(-abs(z)))
                delta[n, k] = (a - y) / (N * out)
            row_loss[n] = total / out
        else:
            zmax = Z[n, 0]
            for k in range(1, out):
                zmax = max(zmax, Z[n, k])
            s = 0.0
            for k in range(out):
                s += math.exp(Z[n, k] - zmax)     # shifted by the row max: exp cannot overflow
            log_s = math.log(s)
            for k in range(out):
                log_p = Z[n, k] - zmax - log_s
                p = math.exp(log_p)
                A[n, k] = p
                delta[n, k] = (p - Y[n, k]) / N
                total -= Y[n, k] * log_p
            row_loss[n] = total


# ---- the kernel table: every kernel with the argument types numba_backend.py launches it with ----------------
KERNEL_DTYPES = ("float32", "float64")
KernelLaunch = collections.namedtuple("KernelLaunch", "name dtype kernel argtypes")


def launch_table():
    """One KernelLaunch per kernel of this module and dtype: the numba types of the arguments that
    numba_backend.py passes, which are the types a GPU launch compiles for (the training loop's kernels,
    optimizers included, are in numba_loop_kernels.launch_table()). Arrays are C-contiguous (the backend makes
    every array it launches on contiguous); a Python int is int64, a Python float float64 and a Python bool
    boolean, as numba types launch arguments.
    tests/test_numba_compile.py compiles every entry for real GPUs and checks that no kernel is missing."""
    i64, f64, flag = numba.int64, numba.float64, numba.boolean
    table = []
    for dtype_name in KERNEL_DTYPES:
        dt = numba.from_dtype(np.dtype(dtype_name))
        mat, vec = dt[:, ::1], dt[::1]
        tiles = kernels_for(dtype_name)
        for kernel, argtypes in (
                # A_prev, W, b, has_bias, act, alpha, Z, A
                (tiles.dense_forward, (mat, mat, vec, flag, i64, f64, mat, mat)),
                # delta, W, masked, Z_prev, A_prev, act, alpha, out
                (tiles.input_grad, (mat, mat, flag, mat, mat, i64, f64, mat)),
                # delta, A_prev, accumulate, dW
                (tiles.weight_grad, (mat, mat, flag, mat)),
                # row_loss, 1/N, loss_out
                (tiles.sum, (vec, f64, vec)),
                # delta, accumulate, db
                (bias_grad_kernel, (mat, flag, vec)),
                # dA, Z, A, act, alpha, delta
                (activation_mask_kernel, (mat, mat, mat, i64, f64, mat)),
                # x (flat), flag
                (nonfinite_flag_kernel, (vec, numba.int32[::1])),
                # labels, out
                (one_hot_kernel, (numba.int64[::1], mat)),
                # loss, act, alpha, Z, Y, A, delta, row_loss
                (loss_rows_kernel, (i64, i64, f64, mat, mat, mat, mat, vec))):
            table.append(KernelLaunch(kernel.py_func.__name__, dtype_name, kernel, argtypes))
    return table


def _dispatchers(namespace, device):
    """The cuda.jit functions of a module or namespace: kernels (device=False) or device functions (True)."""
    return {name: value for name, value in vars(namespace).items()
            if hasattr(value, "targetoptions") and hasattr(value, "py_func")
            and bool(value.targetoptions.get("device")) == device}


def all_kernels():
    """{(kernel name, dtype or None): dispatcher} for every kernel of this module, found by looking (module
    globals and each dtype's kernels_for set), not from launch_table: what the table must cover."""
    found = {(k.py_func.__name__, None): k for k in _dispatchers(_module_namespace(), device=False).values()}
    for dtype_name in KERNEL_DTYPES:
        for k in _dispatchers(kernels_for(dtype_name), device=False).values():
            found[(k.py_func.__name__, dtype_name)] = k
    return found


def _module_namespace():
    return types.SimpleNamespace(**globals())


_DEVICE_OVERLOADS = {}   # (device function name, cc) -> that function's overloads compiled for cc


def compile_ptx(kernel, argtypes, cc):
    """PTX of one of this module's kernels for `argtypes` and compute capability `cc` (a (major, minor) tuple),
    with no GPU and no CUDA driver: needs only NVRTC and libNVVM (CUDA_HOME). The same options as a launch
    (opt=True, no fastmath, no debug). Not available under the simulator.

    Why not just numba.cuda.compile_ptx(kernel.py_func, argtypes, cc=cc): it takes `cc` for the kernel, but
    numba-cuda (0.30) compiles each device function the kernel calls in CUDADispatcher.compile_device, for
    get_current_device().compute_capability, which asks the driver: with no GPU that raises CudaSupportError,
    and with one the device functions are lowered for that GPU whatever `cc` the kernel is for (and cached by
    argument types only). So, holding numba's compiler lock, the dispatcher module's device lookup answers
    `cc`, and each device function of this module compiles into overloads kept per cc (its own are put back
    afterwards): a device function lowered for one cc is never linked into a kernel for another."""
    if cuda.config.ENABLE_CUDASIM:
        raise RuntimeError("compile_ptx needs the real numba.cuda compiler: unset NUMBA_ENABLE_CUDASIM")
    from numba.cuda import dispatcher as cuda_dispatcher
    from numba.cuda.core.compiler_lock import global_compiler_lock
    if not hasattr(cuda_dispatcher, "get_current_device"):
        raise RuntimeError("numba.cuda.dispatcher no longer looks up get_current_device: compile_ptx needs "
                           "updating for this numba-cuda version")
    cc = tuple(cc)
    device_functions = _dispatchers(_module_namespace(), device=True)
    with global_compiler_lock:
        saved_lookup = cuda_dispatcher.get_current_device
        saved = {name: fn.overloads for name, fn in device_functions.items()}
        cuda_dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=cc)
        try:
            for name, fn in device_functions.items():
                fn.overloads = _DEVICE_OVERLOADS.setdefault((name, cc), collections.OrderedDict())
            ptx, _ = cuda.compile_ptx(kernel.py_func, tuple(argtypes), cc=cc, opt=True, fastmath=False)
        finally:
            cuda_dispatcher.get_current_device = saved_lookup
            for name, fn in device_functions.items():
                fn.overloads = saved[name]
    return ptx
