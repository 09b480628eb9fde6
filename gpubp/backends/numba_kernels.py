"""The kernel set of SPEC section 3 written with numba.cuda.jit: the same math as kernels/*.cu, in Python.

Shapes (row-major, rows are samples): A_prev (N, in), W (out, in), b (out,), Z, A, δ (N, out).

Every kernel runs on a real GPU and, slowly, on the CPU under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1):
so no warp intrinsics, and each cuda.shared.array on its own line. No kernel uses atomics: every reduction
is summed in a fixed order, so every op is bit-identical run to run (deterministic mode needs nothing more).

Mixed precision (issue 12; the contract is in backends/base.py): the GEMM kernels of a reduced precision round
their float32 operands to it as they load them into shared memory (tf32 and bf16 by integer RNE on the float32
bits, fp16 by the float16 conversion, cvt.rn.f16.f32), read 16-bit stored operands exactly, multiply and
accumulate in float32, and store each output in its array's dtype: float32, float16 (fp16 storage, written by
cvt.rn.f16.f32) or uint16 holding bfloat16 bits (bf16 storage; numba has no bfloat16 array type the simulator
knows, so the bits are rounded by integer RNE). No tensor cores: the products are plain float32 FMAs. How each
array is read or written (its "kind", below) is fixed when a kernel is built: a kernel per combination, made on
first use (the *_kernel_for factories), and the fp32 kernels are the code they were (every kind branch folds).
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


# ---- reduced precision: how a kernel reads and writes an element (issue 12) ----------------------------------
# Every array argument of a kernel has a kind, fixed when the kernel is built (a closure constant: the compiler
# folds each `kind == ...` test, so a kernel holds only the code of its own kinds).
PLAIN = 0                    # the element as it is, in its array's dtype: every array of the fp32 kernels
TF32, BF16, FP16 = 1, 2, 3   # a float32 GEMM operand, rounded (RNE) to the precision as it is loaded
F16 = 4                      # a float16 array (fp16 storage): read exactly; written RNE from float32
BF16_BITS = 5                # a uint16 array of bfloat16 bit patterns (bf16 storage): read exactly; written RNE
KIND_NAMES = ("plain", "tf32", "bf16", "fp16", "f16", "bf16bits")
ROUNDING = {"fp32": PLAIN, "tf32": TF32, "bf16": BF16, "fp16": FP16}   # a float32 GEMM operand's kind
STORED = {"fp32": PLAIN, "tf32": PLAIN, "bf16": BF16_BITS, "fp16": F16}  # the kind of storage_dtype(p) arrays
STORAGE_DTYPES = {"fp32": np.dtype(np.float32), "tf32": np.dtype(np.float32), "bf16": np.dtype(np.uint16),
                  "fp16": np.dtype(np.float16)}


@cuda.jit(device=True)
def float32_bits(x):
    """The bit pattern of x (made float32 first) as an int64 in [0, 2³²): a register move on the GPU, numpy's
    view under the simulator (the same code). int64, so that the integer rounding below never wraps and never
    mixes signed with unsigned types (numba types uint64 with int64 as float64)."""
    return np.int64(np.float32(x).view(np.uint32))


@cuda.jit(device=True)
def bits_float32(bits):
    """The float32 whose bit pattern is the low 32 bits of the integer `bits` (float32_bits' inverse)."""
    return np.uint32(bits).view(np.float32)


@cuda.jit(device=True)
def round_tf32(x):
    """x (float32) rounded to tf32 (10 mantissa bits, float32's exponent), RNE at bit 13 of the bit pattern, as
    gpubp.precision.round_tf32: adding 0xFFF plus the kept part's lowest bit carries into the kept part exactly
    when the 13 dropped bits are above half, or half with an odd kept part; a carry out of the mantissa bumps the
    exponent (past the largest: the inf pattern, RNE's overflow). inf and NaN skip the carry; NaN is made quiet."""
    bits = float32_bits(x)
    if (bits & 0x7F800000) == 0x7F800000:
        out = bits & 0xFFFFE000
        if (bits & 0x007FFFFF) != 0:
            out |= 0x00400000
        return bits_float32(out)
    return bits_float32((bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000)


@cuda.jit(device=True)
def bf16_bits(x):
    """The bfloat16 nearest x (float32), ties to even, as its 16-bit pattern (an int64 in [0, 2¹⁶)): the top
    half of x's bits after adding 0x7FFF plus the kept part's lowest bit (round_tf32's carry, at bit 16; a finite
    x at or past half a bf16 ulp above the largest bf16 gives inf). NaN gives the quiet NaN of its sign,
    0x7FC0 | sign, as ml_dtypes.bfloat16 (precision.round_operand) does: a NaN whose payload lies only in the
    low 16 bits would otherwise turn into inf."""
    bits = float32_bits(x)
    if (bits & 0x7FFFFFFF) > 0x7F800000:
        return ((bits >> 16) & 0x8000) | 0x7FC0
    return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16


@cuda.jit(device=True)
def bf16_value(b):
    """The float32 value of the bfloat16 bits b, exactly (bfloat16 is float32's top half)."""
    return bits_float32(np.int64(b) << 16)


@cuda.jit(device=True)
def round_fp16(x):
    """x (float32) rounded to float16, RNE, and back, exactly: cvt.rn.f16.f32 then cvt.f32.f16 on the GPU."""
    return np.float32(np.float16(x))


@cuda.jit(device=True)
def operand(v, kind):
    """A GEMM operand element v as the float32 the products use, per its kind (not PLAIN: gemm_tile reads those
    as they are): a float32 rounded to the precision, or a 16-bit stored element read exactly."""
    if kind == BF16_BITS:
        return bf16_value(v)
    x = np.float32(v)
    if kind == TF32:
        return round_tf32(x)
    if kind == BF16:
        return bf16_value(bf16_bits(x))
    if kind == FP16:
        return round_fp16(x)
    return x


@cuda.jit(device=True)
def decode(v, kind):
    """An element read as float32 in a reduced-precision kernel: bfloat16 bits decoded; float16 and float32 cast
    (exact)."""
    if kind == BF16_BITS:
        return bf16_value(v)
    return np.float32(v)


@cuda.jit(device=True)
def store(out, m, n, value, kind):
    """out[m, n] = value in out's format, rounded from float32 (RNE): bfloat16 bits by bf16_bits, float16 by the
    conversion (cvt.rn.f16.f32), float32 as it is. NOTE: value is made float32 first, as the reference computes
    it: a float64 intermediate stored straight into float16 would be rounded once from float64 (cvt.rn.f16.f64),
    which is not round(round_f32(value)) at the formats' ties."""
    x = np.float32(value)
    if kind == BF16_BITS:
        out[m, n] = bf16_bits(x)
    else:
        out[m, n] = x


# ---- the tiled GEMM core ---------------------------------------------------------------------------------
@cuda.jit(device=True)
def gemm_tile(Aop, a_kcontig, a_kind, Bop, b_kcontig, b_kind, M, N, K, acc, As, Bs):
    """acc[i, j] = Σ_k A(m, k)·B(k, n) for this thread's TM x TN outputs of the block's BM x BN tile, where
        A(m, k) = Aop[m, k] if a_kcontig else Aop[k, m]      B(k, n) = Bop[n, k] if b_kcontig else Bop[k, n]
    so Z = A_prev·Wᵀ, dA = δ·W and dW = δᵀ·A_prev all read their operands in place, untransposed.
    a_kind, b_kind: how the operands are read (PLAIN: as they are; else operand(): rounded to the precision, or
    decoded, once per element as the tile is loaded into shared memory, which then holds float32).
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
                if a_kind == PLAIN:
                    As[kk, mm] = Aop[m, k] if a_kcontig else Aop[k, m]
                else:
                    As[kk, mm] = operand(Aop[m, k] if a_kcontig else Aop[k, m], a_kind)
            else:
                As[kk, mm] = 0
        for e in range(tid, BN * BK, GEMM_THREADS[0] * GEMM_THREADS[1]):
            kk, nn = e // BN, e % BN
            n, k = n0 + nn, k0 + kk
            if n < N and k < K:
                if b_kind == PLAIN:
                    Bs[kk, nn] = Bop[n, k] if b_kcontig else Bop[k, n]
                else:
                    Bs[kk, nn] = operand(Bop[n, k] if b_kcontig else Bop[k, n], b_kind)
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


# ---- the kernels built per dtype and kinds ---------------------------------------------------------------------
# cuda.shared.array and cuda.local.array need their element type at compile time and the kinds are constants, so
# each (dtype, kinds) gets its own kernel, built once (a closure). The fp32 kernels are the all-PLAIN ones.
_BUILT = {}   # (kernel name, dtype, kinds) -> dispatcher: every kernel the factories below have built


def _built(name, key, kernel):
    _BUILT[(name, key[0], key[1:])] = kernel
    return kernel


@functools.lru_cache(maxsize=None)
def dense_forward_kernel_for(dtype_name, x_kind=PLAIN, w_kind=PLAIN, a_kind=PLAIN):
    """The forward GEMM for one dtype and the kinds of A_prev, W (operands) and A (output)."""
    dt = numba.from_dtype(np.dtype(dtype_name))

    @cuda.jit
    def dense_forward_kernel(A_prev, W, b, has_bias, act, alpha, Z, A):
        """Z = A_prev · Wᵀ + b, A = g(Z); A_prev (N, in), W (out, in), b (out,), Z and A (N, out). Reduced
        precision: Z = round_p(A_prev) · round_p(W)ᵀ + b accumulated in float32, A = store(g(Z)) in A's dtype.
        Launch: grid gemm_grid(N, out) = (ceil(N/BM), ceil(out/BN)), batch rows on x; block GEMM_THREADS.
        Traffic: A_prev read ceil(out/BN) times, W ceil(N/BM) times, b once per tile; Z and A written once
        (a 16-bit A_prev or A moves 2 bytes an element, not 4)."""
        As = cuda.shared.array((BK, BM), dt)
        Bs = cuda.shared.array((BK, BN), dt)
        acc = cuda.local.array((TM, TN), dt)
        M, N, K = A_prev.shape[0], W.shape[0], A_prev.shape[1]
        gemm_tile(A_prev, True, x_kind, W, True, w_kind, M, N, K, acc, As, Bs)
        for i in range(TM):
            for j in range(TN):
                m, n = output_position(i, j)
                if m < M and n < N:
                    z = acc[i, j] + b[n] if has_bias else acc[i, j]
                    Z[m, n] = z
                    if a_kind == PLAIN:
                        A[m, n] = activation_forward(act, z, alpha)
                    else:
                        store(A, m, n, activation_forward(act, z, alpha), a_kind)

    return _built("dense_forward_kernel", (dtype_name, x_kind, w_kind, a_kind), dense_forward_kernel)


@functools.lru_cache(maxsize=None)
def input_grad_kernel_for(dtype_name, d_kind=PLAIN, w_kind=PLAIN, aprev_kind=PLAIN, out_kind=PLAIN):
    """The input-gradient GEMM for one dtype and the kinds of δ, W (operands), A_prev (read for g') and out."""
    dt = numba.from_dtype(np.dtype(dtype_name))

    @cuda.jit
    def input_grad_kernel(delta, W, masked, Z_prev, A_prev, act, alpha, out):
        """dA_prev = δ · W, or with `masked` δ_prev = (δ · W) ⊙ g'(Z_prev) (the previous layer's mask as the
        epilogue); δ (N, out), W (out, in), Z_prev, A_prev and out (N, in). Reduced precision: round_p(δ) ·
        round_p(W) accumulated in float32, g' from Z_prev or the stored A_prev (read exactly), the product stored
        once in out's dtype. Launch: grid gemm_grid(N, in) = (ceil(N/BM), ceil(in/BN)), batch rows on x; block
        GEMM_THREADS. Traffic: δ read ceil(in/BN) times, W ceil(N/BM) times; out written once, Z_prev and A_prev
        read once when masked (else never)."""
        As = cuda.shared.array((BK, BM), dt)
        Bs = cuda.shared.array((BK, BN), dt)
        acc = cuda.local.array((TM, TN), dt)
        M, N, K = delta.shape[0], W.shape[1], delta.shape[1]
        gemm_tile(delta, True, d_kind, W, False, w_kind, M, N, K, acc, As, Bs)
        for i in range(TM):
            for j in range(TN):
                m, n = output_position(i, j)
                if m < M and n < N:
                    if out_kind == PLAIN and aprev_kind == PLAIN:
                        if masked:
                            out[m, n] = acc[i, j] * activation_derivative(act, Z_prev[m, n], A_prev[m, n], alpha)
                        else:
                            out[m, n] = acc[i, j]
                    elif masked:
                        store(out, m, n, acc[i, j] * activation_derivative(
                            act, Z_prev[m, n], decode(A_prev[m, n], aprev_kind), alpha), out_kind)
                    else:
                        store(out, m, n, acc[i, j], out_kind)

    return _built("input_grad_kernel", (dtype_name, d_kind, w_kind, aprev_kind, out_kind), input_grad_kernel)


@functools.lru_cache(maxsize=None)
def weight_grad_kernel_for(dtype_name, d_kind=PLAIN, a_kind=PLAIN):
    """The weight-gradient GEMM for one dtype and the kinds of its operands δ and A_prev (dW is always PLAIN)."""
    dt = numba.from_dtype(np.dtype(dtype_name))

    @cuda.jit
    def weight_grad_kernel(delta, A_prev, accumulate, dW):
        """dW (=|+=) δᵀ · A_prev = Σₙ δₙ aₙᵀ, the seed's outer products summed over the batch in a fixed order;
        δ (N, out), A_prev (N, in), dW (out, in). Reduced precision: round_p(δ)ᵀ · round_p(A_prev) accumulated
        in float32. Launch: grid gemm_grid(out, in) = (ceil(out/BM), ceil(in/BN)), block GEMM_THREADS: the batch
        is K here, walked inside each block, so the grid does not grow with N. Traffic: δ read ceil(in/BN) times,
        A_prev ceil(out/BM) times; dW read (when accumulating) and written once."""
        As = cuda.shared.array((BK, BM), dt)
        Bs = cuda.shared.array((BK, BN), dt)
        acc = cuda.local.array((TM, TN), dt)
        M, N, K = dW.shape[0], dW.shape[1], delta.shape[0]
        gemm_tile(delta, False, d_kind, A_prev, False, a_kind, M, N, K, acc, As, Bs)
        for i in range(TM):
            for j in range(TN):
                m, n = output_position(i, j)
                if m < M and n < N:
                    if accumulate:
                        dW[m, n] += acc[i, j]
                    else:
                        dW[m, n] = acc[i, j]

    return _built("weight_grad_kernel", (dtype_name, d_kind, a_kind), weight_grad_kernel)


@functools.lru_cache(maxsize=None)
def sum_kernel_for(dtype_name):
    dt = numba.from_dtype(np.dtype(dtype_name))

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

    return _built("sum_kernel", (dtype_name,), sum_kernel)


def kernels_for(dtype_name):
    """The fp32 (all-PLAIN) GEMM and reduction kernels of one dtype ("float32"/"float64"), as a namespace."""
    return types.SimpleNamespace(dense_forward=dense_forward_kernel_for(dtype_name),
                                 input_grad=input_grad_kernel_for(dtype_name),
                                 weight_grad=weight_grad_kernel_for(dtype_name), sum=sum_kernel_for(dtype_name))


@functools.lru_cache(maxsize=None)
def bias_grad_kernel_for(d_kind=PLAIN):
    """The bias gradient for δ of one kind (PLAIN: any dtype, summed in it; else summed in float32)."""

    @cuda.jit
    def bias_grad_kernel(delta, accumulate, db):
        """db (=|+=) Σₙ δₙ; δ (N, out), db (out,): one thread per output column, summing rows in order (no
        atomics); a 16-bit δ is read exactly and summed in float32 (db of the stored δ). Launch: 1-D
        grid-stride over out (grid_stride_blocks(out)). Traffic: δ read once, db written once."""
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for j in range(start, db.shape[0], stride):
            if d_kind == PLAIN:
                s = delta[0, j] * 0
                for n in range(delta.shape[0]):
                    s += delta[n, j]
            else:
                s = np.float32(0)
                for n in range(delta.shape[0]):
                    s += decode(delta[n, j], d_kind)
            if accumulate:
                db[j] += s
            else:
                db[j] = s

    return _built("bias_grad_kernel", ("any", d_kind), bias_grad_kernel)


bias_grad_kernel = bias_grad_kernel_for(PLAIN)


@functools.lru_cache(maxsize=None)
def round_to_storage_kernel_for(kind):
    """The rounding of a flat float32 array into 16-bit storage of one kind (BF16_BITS or F16)."""

    @cuda.jit
    def round_to_storage_kernel(src, dst):
        """dst = src rounded RNE to the storage format (bfloat16 bits by bf16_bits, float16 by the conversion),
        as store() rounds an output; src (P,) float32, dst (P,). Launch: 1-D grid-stride over P. Traffic: src
        read once, dst written once."""
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, src.shape[0], stride):
            x = np.float32(src[i])
            if kind == BF16_BITS:
                dst[i] = bf16_bits(x)
            else:
                dst[i] = x

    return _built("round_to_storage_kernel", ("any", kind), round_to_storage_kernel)


# ---- elementwise ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def activation_mask_kernel_for(da_kind=PLAIN, a_kind=PLAIN, d_kind=PLAIN):
    """The activation mask for dA, A and δ of the given kinds (Z is always PLAIN)."""

    @cuda.jit
    def activation_mask_kernel(dA, Z, A, act, alpha, delta):
        """δ = dA ⊙ g'(Z) over the flattened (N, out) arrays (δ may be dA); 16-bit arrays read exactly, the
        product stored once in δ's dtype. Launch: 1-D grid-stride over N·out (grid_stride_blocks). Traffic: dA,
        Z and A read once, δ written once."""
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for e in range(start, delta.size, stride):
            n, j = e // delta.shape[1], e % delta.shape[1]
            if da_kind == PLAIN and a_kind == PLAIN and d_kind == PLAIN:
                delta[n, j] = dA[n, j] * activation_derivative(act, Z[n, j], A[n, j], alpha)
            else:
                store(delta, n, j, decode(dA[n, j], da_kind) * activation_derivative(
                    act, Z[n, j], decode(A[n, j], a_kind), alpha), d_kind)

    return _built("activation_mask_kernel", ("any", da_kind, a_kind, d_kind), activation_mask_kernel)


activation_mask_kernel = activation_mask_kernel_for()


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
@cuda.jit(device=True)
def store_delta(delta, n, k, value, d_kind, scaled, s):
    """δ[n, k] = value: as it is (the fp32 kernel), or made float32, times the loss scale s (float32) when
    `scaled`, and stored once in δ's format."""
    if d_kind == PLAIN and not scaled:
        delta[n, k] = value
    else:
        x = np.float32(value)
        if scaled:
            x = x * s
        store(delta, n, k, x, d_kind)


@cuda.jit(device=True)
def loss_row(loss, act, alpha, Z, Y, A, delta, row_loss, n, d_kind, scaled, s):
    """Row n of loss_rows_kernel: writes A[n, :], δ[n, :] (through store_delta) and row_loss[n]."""
    N, out = Z.shape[0], Z.shape[1]
    total = 0.0
    if loss == MSE:
        for k in range(out):
            z = Z[n, k]
            a = activation_forward(act, z, alpha)
            A[n, k] = a
            d = a - Y[n, k]
            total += d * d
            store_delta(delta, n, k, d / N * activation_derivative(act, z, a, alpha), d_kind, scaled, s)
        row_loss[n] = 0.5 * total
    elif loss == BCE:
        for k in range(out):
            z = Z[n, k]
            y = Y[n, k]
            a = activation_forward(SIGMOID, z, alpha)
            A[n, k] = a
            total += max(z, 0) - z * y + math.log1p(math.exp(-abs(z)))
            store_delta(delta, n, k, (a - y) / (N * out), d_kind, scaled, s)
        row_loss[n] = total / out
    else:
        zmax = Z[n, 0]
        for k in range(1, out):
            zmax = max(zmax, Z[n, k])
        e = 0.0
        for k in range(out):
            e += math.exp(Z[n, k] - zmax)     # shifted by the row max: exp cannot overflow
        log_e = math.log(e)
        for k in range(out):
            log_p = Z[n, k] - zmax - log_e
            p = math.exp(log_p)
            A[n, k] = p
            store_delta(delta, n, k, (p - Y[n, k]) / N, d_kind, scaled, s)
            total -= Y[n, k] * log_p
        row_loss[n] = total


@cuda.jit
def loss_rows_kernel(loss, act, alpha, Z, Y, A, delta, row_loss):
    """Per row n (one thread each, grid-stride): A = F(Z), δ = ∂L/∂Z and row_loss[n], such that L is
    Σₙ row_loss[n] / N (summed afterwards by sum_kernel, in a fixed order):
        MSE        row_loss = ½‖F(z) − y‖²            δ = (A − y)/N ⊙ F'(Z)
        BCE        row_loss = mean over outputs of max(z, 0) − z·y + log(1 + e^−|z|)     δ = (σ(z) − y)/(N·out)
        SOFTMAX_CE row_loss = −Σₖ yₖ log softmax(z)ₖ  δ = (softmax(z) − y)/N
    Z, Y, A, δ (N, out), row_loss (N,). Launch: 1-D grid-stride over the N rows. Traffic: Z and Y read once
    (softmax reads Z three times, from cache), A and δ written once."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for n in range(start, Z.shape[0], stride):
        loss_row(loss, act, alpha, Z, Y, A, delta, row_loss, n, PLAIN, False, 1.0)


@functools.lru_cache(maxsize=None)
def loss_rows_scaled_kernel_for(d_kind, scaled):
    """loss_rows_kernel for a reduced precision: δ of kind d_kind, and with `scaled` the fp16 loss scale."""

    @cuda.jit
    def loss_rows_kernel(loss, act, alpha, Z, Y, A, delta, row_loss, scale):
        """loss_rows_kernel (above), with δ = store(S · ∂L/∂Z): ∂L/∂Z made float32, times S = float32(scale[0])
        when scaled (the fp16 loss scale, gpubp/loss_scale.py; exact for a power of two short of overflow), then
        stored once in δ's dtype. The loss and A are never scaled. scale (1,) float64, read once per thread.
        Launch and traffic: as loss_rows_kernel (δ 2 bytes an element when 16-bit)."""
        s = np.float32(scale[0]) if scaled else np.float32(1)
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for n in range(start, Z.shape[0], stride):
            loss_row(loss, act, alpha, Z, Y, A, delta, row_loss, n, d_kind, scaled, s)

    return _built("loss_rows_kernel", ("float32", d_kind, scaled), loss_rows_kernel)


# ---- the kernel table: every kernel with the argument types numba_backend.py launches it with ----------------
KERNEL_DTYPES = ("float32", "float64")
KernelLaunch = collections.namedtuple("KernelLaunch", "name dtype kernel argtypes variant", defaults=("",))


def variant_name(kinds):
    """A launch-table label for a kernel's kinds (and loss scaling): e.g. "bf16bits,bf16,plain"."""
    return ",".join(("scaled" if k else "unscaled") if isinstance(k, bool) else KIND_NAMES[k] for k in kinds)


def _kind_array(kind, ndim=2):
    """The numba type of a C-contiguous array of `kind`: float16 (F16), uint16 (BF16_BITS), else float32."""
    dt = numba.types.float16 if kind == F16 else numba.uint16 if kind == BF16_BITS else numba.float32
    return dt[:, ::1] if ndim == 2 else dt[::1]


def precision_launches(precision):
    """[(factory, kinds, argtypes)]: the reduced-precision kernels a float32 network of `precision` launches
    (tf32, bf16, fp16), with the argument types it launches them with. Per layer the backend picks the kinds
    from the arrays: an operand is rounded (X, W: float32) or stored (hidden A, δ, and W from the bf16/fp16
    network's copy made by round_to_storage_kernel: storage_dtype); an output
    is float32 (Z, the output layer's A, dW) or stored. The fp16 loss gradient carries the loss scale."""
    i64, f64, flag = numba.int64, numba.float64, numba.boolean
    mat, vec = numba.float32[:, ::1], numba.float32[::1]
    r, s = ROUNDING[precision], STORED[precision]
    h = r if s == PLAIN else s                 # a hidden A or a δ as a GEMM operand
    out = []
    ws = sorted({r, h})                        # W: float32 (rounded), or the network's 16-bit copy (stored)
    for x in sorted({r, h}):                   # A_prev: the staged X (float32), or a hidden A
        for w in ws:
            for a in sorted({s, PLAIN}):       # A: a hidden layer's (stored), or the output layer's (float32)
                # A_prev, W, b, has_bias, act, alpha, Z, A
                out.append((dense_forward_kernel_for, ("float32", x, w, a),
                            (_kind_array(x), _kind_array(w), vec, flag, i64, f64, mat, _kind_array(a))))
        # delta, A_prev, accumulate, dW
        out.append((weight_grad_kernel_for, ("float32", h, x), (_kind_array(h), _kind_array(x), flag, mat)))
    for w in ws:
        # delta, W, masked, Z_prev, A_prev, act, alpha, out
        out.append((input_grad_kernel_for, ("float32", h, w, s, s),
                    (_kind_array(h), _kind_array(w), flag, mat, _kind_array(s), i64, f64, _kind_array(s))))
    if s != PLAIN:
        # src, dst: the network's 16-bit copy of its parameters
        out.append((round_to_storage_kernel_for, (s,), (vec, _kind_array(s, 1))))
        # delta, accumulate, db
        out.append((bias_grad_kernel_for, (s,), (_kind_array(s), flag, vec)))
        # dA, Z, A, act, alpha, delta
        out.append((activation_mask_kernel_for, (s, s, s),
                    (_kind_array(s), mat, _kind_array(s), i64, f64, _kind_array(s))))
    scaled = precision == "fp16"
    if s != PLAIN or scaled:
        # loss, act, alpha, Z, Y, A, delta, row_loss, scale
        out.append((loss_rows_scaled_kernel_for, (s, scaled),
                    (i64, i64, f64, mat, mat, mat, _kind_array(s), vec, numba.float64[::1])))
    return out


def launch_table():
    """One KernelLaunch per kernel of this module, dtype and variant: the numba types of the arguments that
    numba_backend.py passes, which are the types a GPU launch compiles for (the training loop's kernels,
    optimizers included, are in numba_loop_kernels.launch_table()). Arrays are C-contiguous (the backend makes
    every array it launches on contiguous); a Python int is int64, a Python float float64 and a Python bool
    boolean, as numba types launch arguments. The fp32 kernels come per dtype (variant ""); the reduced-precision
    ones per precision_launches (dtype float32, variant their kinds).
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
    seen = set()
    for precision in ("tf32", "bf16", "fp16"):
        for factory, key, argtypes in precision_launches(precision):
            kernel = factory(*key)
            kinds = key[1:] if isinstance(key[0], str) else key     # without the dtype
            entry = KernelLaunch(kernel.py_func.__name__, "float32", kernel, argtypes, variant_name(kinds))
            if (entry.name, entry.variant) not in seen:
                seen.add((entry.name, entry.variant))
                table.append(entry)
    return table


def _dispatchers(namespace, device):
    """The cuda.jit functions of a module or namespace: kernels (device=False) or device functions (True)."""
    return {name: value for name, value in vars(namespace).items()
            if hasattr(value, "targetoptions") and hasattr(value, "py_func")
            and bool(value.targetoptions.get("device")) == device}


def all_kernels():
    """{(kernel name, dtype or None, variant): dispatcher} for every kernel of this module, found by looking
    (module globals, each dtype's kernels_for set, and every reduced-precision variant a factory has built so
    far, by launch_table or by a backend's launches), not from launch_table: what the table must cover."""
    found = {(k.py_func.__name__, None, ""): k for k in _dispatchers(_module_namespace(), device=False).values()}
    for dtype_name in KERNEL_DTYPES:
        for k in _dispatchers(kernels_for(dtype_name), device=False).values():
            found[(k.py_func.__name__, dtype_name, "")] = k
    for (name, _, kinds), k in list(_BUILT.items()):
        if any(kinds):   # not the fp32 kernel
            found[(name, "float32", variant_name(kinds))] = k
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
    afterwards): a device function lowered for one cc is never linked into a kernel for another.
    NOTE: numba's own overloads that compile through a dispatcher (the scalar `.view` of float32_bits and
    bits_float32) also ask the stand-in lookup, and numba caches them by argument types only: they are a bitcast,
    the same for every cc, so one lowering serves both."""
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
