"""Mixed precision on the cupy backend (issue 12), run on the CPU emulation of CUDA: the tensor-core dense-layer
kernels (kernels/dense_tc.cu on gemm_tc.cuh), the 16-bit storage conversions (kernels/storage.cuh), loss_grad's
scaled and stored δ (kernels/loss.cu) and the fp16 loss scaler (kernels/loss_scale.cu), each through CupyBackend's
own launch code (tests/cuda_emulation: the real CUDA C, strict about memory, schedule and shared memory), against
the numpy reference of the same precision: gpubp.precision (round_operand, reference_gemm, decode) and
gpubp/loss_scale.py's rule.

Tolerances, and why they are tight (test_tc_gemm.py's module docstring has the GEMM's): a GEMM's float32 result
is within tc_tol = (ceil(K / mma_k) + 1) · 8u · (|round_p(A)|·|round_p(B)|ᵀ) of reference_gemm (u = 2^-24). An
epilogue adds a float32 bias (one more rounding) and applies g or g' in float32; a stored output is then rounded
once to its format, which moves it by at most one ulp of the format, 2^(1-p)·|x| (p = significand bits: 8 bf16,
11 fp16): where the float32 value sits within tc_tol of a rounding boundary the kernel and the reference may round
to the two neighbours. So a stored output passes when |decode(out) − round_p(ref)| <= |g'|·tc_tol + 2^(1-p)·|ref|,
a float32 one when within |g'|·tc_tol + a few float32 ulps. A fragment-index or epilogue error moves whole products
(relative error ~1) and fails these by orders of magnitude (the planted bugs in the report of issue 12 did).
"""
import math

import numpy as np
import pytest

from gpubp import activations as acts
from gpubp import guard as G
from gpubp import loss_scale as LS
from gpubp import losses
from gpubp import precision as prec
from gpubp.backends import cuda_sources
from gpubp.backends import cupy_backend as cb

from cuda_emulation import emulator as emulator_module

ml_dtypes = pytest.importorskip("ml_dtypes")

PRECISIONS = ["tf32", "bf16", "fp16"]
MMA_K = {"bf16": 16, "fp16": 16, "tf32": 8}
ACTIVATIONS = list(acts.NAMES.values())
# (N, in, out): one element; below a tile and a chunk; odd sizes across tiles; 16-byte rows; one batch > 1000
SHAPES = [(1, 1, 1), (7, 33, 5), (33, 7, 129), (130, 64, 24), (1031, 9, 17)]
U32 = 2.0**-24


@pytest.fixture(scope="module")
def backend(emulator):
    """CupyBackend on the emulator, as an H100 (132 SMs: weight_grad splits a batch of 1031 into slices)."""
    patch = pytest.MonkeyPatch()
    for module, name, value in emulator_module.patches(emulator, 132):
        patch.setattr(module, name, value)
    yield cb.CupyBackend()
    patch.undo()


def stored(x, precision, offset=0):
    """x as the backend stores it for `precision` (storage_dtype: float32, bf16 bits in uint16, float16), placed
    `offset` elements past a 16-byte boundary (1: the element-by-element and scalar paths)."""
    values = prec.to_storage(x, precision)
    if precision == "fp16":
        values = values.view(np.float16)
    raw = np.empty(values.size + offset + 16, values.dtype)
    skip = (-raw.ctypes.data % 16) // raw.itemsize + offset
    array = raw[skip:skip + values.size].reshape(values.shape)
    array[...] = values
    return array


def poisoned(shape, dtype, offset=0):
    """An output array of NaN (0x7FFF for bf16 bits: NaN in bf16 and fp16) that a kernel must overwrite."""
    dtype = np.dtype(dtype)
    nan = np.array(0x7FFF, np.uint16).view(dtype) if dtype.itemsize == 2 else np.array(np.nan, dtype)
    raw = np.full(int(np.prod(shape)) + offset + 16, nan, dtype)
    skip = (-raw.ctypes.data % 16) // raw.itemsize + offset
    return raw[skip:skip + int(np.prod(shape))].reshape(shape)


def decode(x, precision):
    return prec.decode(np.asarray(x), precision)


def format_ulp(values, precision):
    """One unit in the last place of `precision`'s storage format at |values| (0 for tf32/fp32 storage: float32)."""
    if precision not in ("bf16", "fp16"):
        return np.zeros_like(values, dtype=np.float64)
    bits = prec.SIGNIFICAND_BITS[precision]
    tiny = 2.0**-24 if precision == "fp16" else 2.0**-133   # the subnormal spacing
    return np.maximum(2.0**(1 - bits) * np.abs(values), tiny)


def tc_tol(A, B, precision):
    """The GEMM's bound on |C − reference_gemm(A, B)| (test_tc_gemm.py's)."""
    K = A.shape[1]
    scale = np.abs(prec.round_operand(A, precision)).astype(np.float64) @ \
        np.abs(prec.round_operand(B, precision)).astype(np.float64).T
    return (math.ceil(K / MMA_K[precision]) + 1) * 8 * U32 * scale


def assert_within(got, expected, bound, what):
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    excess = np.abs(got - expected) / np.maximum(bound, 1e-300)
    excess = np.where(np.isnan(got) & ~np.isnan(expected), np.inf, excess)
    worst = float(np.nanmax(excess)) if excess.size else 0.0
    assert worst <= 1, f"{what}: {worst:.3g} x the tolerance at {np.unravel_index(np.nanargmax(excess), excess.shape)}"


def narrow(precision):
    return precision in ("bf16", "fp16")


def stored_format(precision):
    """The format of precision's stored arrays: its own for bf16/fp16, float32 ('fp32': not rounded) for tf32."""
    return precision if narrow(precision) else "fp32"


# ---- storage conversions (storage.cuh), bit for bit --------------------------------------------------------------
def special_floats(rng):
    """Every exponent, the ties and halfway points of both 16-bit formats, their overflow and subnormal edges,
    zeros, infinities, NaN, float32 subnormals, and random values."""
    e = np.arange(-149, 128, dtype=np.float64)
    powers = np.ldexp(1.0, e.astype(int))
    ties = []
    for bits, low in ((8, -133), (11, -24)):   # bf16, fp16 (fp16's subnormal grid 2^-24)
        ulp = np.maximum(powers * 2.0**(1 - bits), 2.0**low)
        ties += [powers + ulp / 2, powers + 1.5 * ulp, powers + ulp / 2 * (1 + 2.0**-10), powers - ulp / 4]
    edges = [65504, 65519.99, 65520, 65536, 2.0**-14, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 2.0**-25 * 1.0001,
             2.0**-26, 3.4028235e38, 3.39e38, 1e-45, 0.0]
    values = np.concatenate([*ties, powers, edges, rng.standard_normal(3000) * 10.0**rng.integers(-8, 8, 3000)])
    with np.errstate(over="ignore"):
        values = values.astype(np.float32)
    values = values[np.isfinite(values)]
    return np.concatenate([values, -values, np.array([np.inf, -np.inf, np.nan, -np.nan], np.float32)])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_to_storage_is_round_to_nearest_even_bit_for_bit(emulator, precision, rng):
    x = special_floats(rng)
    out = poisoned(x.shape, np.uint16)
    emulator_module.EmulatedKernel(emulator, cuda_sources.format_kernel_name(
        "to_storage_kernel", precision))((4,), (256,), [x, out, np.int64(x.size)])
    with np.errstate(over="ignore"):   # overflow to inf is the documented rounding
        expected = prec.to_storage(x, precision)
    finite = ~np.isnan(x)
    np.testing.assert_array_equal(out[finite], expected[finite])
    assert np.isnan(decode(out[~finite], precision)).all()
    assert (out[~finite] & 0x8000 == expected[~finite] & 0x8000).all()   # NaN keeps its sign


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_decode_of_every_16_bit_pattern(emulator, precision):
    bits = np.arange(2**16, dtype=np.uint16)
    out = poisoned(bits.shape, np.float32)
    emulator_module.EmulatedKernel(emulator, f"storage_decode_probe_kernel<"
                                   f"{cuda_sources.STORE_FORMATS[precision]}>")((8,), (256,), [bits, out, np.int64(bits.size)])
    expected = decode(bits, precision)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    np.testing.assert_array_equal(out[~np.isnan(out)].view(np.uint32), expected[~np.isnan(expected)].view(np.uint32))


def test_storage_dtypes(backend):
    assert backend.storage_dtype("fp32") == backend.storage_dtype("tf32") == np.float32
    assert backend.storage_dtype("bf16") == np.uint16 and backend.storage_dtype("fp16") == np.float16
    with pytest.raises(ValueError, match="precision"):
        backend.storage_dtype("fp8")


# ---- dense_forward -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dense_forward(backend, precision, shape, rng):
    """Z (float32) and A (16-bit for a hidden layer, float32 for the output layer), X float32 (converted) or
    already stored; one activation per case, every one over the shapes."""
    N, n_in, n_out = shape
    case = SHAPES.index(shape)
    act = ACTIVATIONS[case % len(ACTIVATIONS)]
    X = rng.standard_normal((N, n_in)).astype(np.float32)
    W = rng.standard_normal((n_out, n_in)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    a_prev = stored(X, precision) if case % 2 else X          # a stored hidden A, or layer 0's float32 X
    out_dtype = backend.storage_dtype(precision) if case % 3 != 2 else np.float32   # hidden, or the output layer
    Z, A = poisoned((N, n_out), np.float32), poisoned((N, n_out), out_dtype)
    backend.dense_forward(a_prev, W.copy(), b, act, 0.1, Z, A, precision=precision)
    Z_ref = prec.reference_gemm(X, W, precision).astype(np.float64) + b
    assert_within(Z, Z_ref, tc_tol(X, W, precision) + 2 * U32 * np.abs(Z_ref), "Z")
    # A from the kernel's own Z: g in float32 (the kernels' expf/tanhf may differ from numpy by an ulp), rounded
    A_ref = acts.forward(act, Z.astype(np.float32), 0.1)
    fmt = stored_format(precision) if out_dtype != np.float32 else "fp32"
    assert_within(decode(A, fmt), prec.round_operand(A_ref, fmt), format_ulp(A_ref, fmt) + 4 * U32 * np.abs(A_ref),
                  "A")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_dense_forward_every_activation_misaligned_and_in_place(backend, precision, rng):
    """Every activation, no bias; arrays one element off alignment (element-by-element operand loads, scalar
    epilogue stores); A = Z for the identity (float32)."""
    N, n_in, n_out = 37, 16, 18
    X = rng.standard_normal((N, n_in)).astype(np.float32)
    W = rng.standard_normal((n_out, n_in)).astype(np.float32)
    Z_ref = prec.reference_gemm(X, W, precision).astype(np.float64)
    bound = tc_tol(X, W, precision) + U32 * np.abs(Z_ref)
    for act in ACTIVATIONS:
        Z, A = poisoned((N, n_out), np.float32, 1), poisoned((N, n_out), backend.storage_dtype(precision), 1)
        backend.dense_forward(stored(X, precision, 1), W, None, act, 0.1, Z, A, precision=precision)
        assert_within(Z, Z_ref, bound, f"Z ({acts.name_of(act) if hasattr(acts, 'name_of') else act})")
        A_ref = acts.forward(act, Z.copy(), 0.1)
        fmt = stored_format(precision)
        assert_within(decode(A, fmt), prec.round_operand(A_ref, fmt), format_ulp(A_ref, fmt) + 4 * U32 * np.abs(A_ref),
                      f"A (act {act})")
    Z = poisoned((N, n_out), np.float32)
    backend.dense_forward(X, W, None, acts.IDENTITY, 0.1, Z, Z, precision=precision)
    assert_within(Z, Z_ref, bound, "Z = A")


# ---- input_grad, input_grad_masked ------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_input_grad_masked(backend, precision, shape, rng):
    """δ_prev = store((round_p(δ)·round_p(W)) ⊙ g'(Z_prev)), g' from Z_prev (relu, leaky_relu) or the stored A_prev
    (sigmoid, tanh); one activation per case, every one over the shapes; the unmasked input_grad too."""
    N, n_in, n_out = shape
    act = ACTIVATIONS[(SHAPES.index(shape) + 2) % len(ACTIVATIONS)]
    sdtype = backend.storage_dtype(precision)
    delta = (rng.standard_normal((N, n_out)) * 1e-2).astype(np.float32)
    W = rng.standard_normal((n_out, n_in)).astype(np.float32)
    Z_prev = rng.standard_normal((N, n_in)).astype(np.float32)
    Z_prev.flat[0] = 0.0                                                   # relu'(0) = 0
    A_prev = stored(acts.forward(act, Z_prev.copy(), 0.1), precision)      # as the forward pass stored it
    d_dev = stored(delta, precision)
    out = poisoned((N, n_in), sdtype)
    backend.input_grad_masked(d_dev, W, Z_prev, A_prev, act, 0.1, out, precision=precision)
    product = prec.reference_gemm(decode(d_dev, precision), W.T, precision).astype(np.float64)
    bound = tc_tol(decode(d_dev, precision), W.T, precision)
    mask = acts.derivative_mask(act, np.ones_like(Z_prev), Z_prev, decode(A_prev, precision), 0.1).astype(np.float64)
    expected = (product * mask).astype(np.float32)
    fmt = stored_format(precision)
    assert_within(decode(out, fmt), prec.round_operand(expected, fmt),
                  np.abs(mask) * bound + format_ulp(expected, fmt) + 2 * U32 * np.abs(expected), "δ_prev")
    dA = poisoned((N, n_in), np.float32)                                  # unmasked, float32 out
    backend.input_grad(d_dev, W, dA, precision=precision)
    assert_within(dA, product, bound + U32 * np.abs(product), "dA_prev")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_input_grad_masked_in_place_and_misaligned(backend, precision, rng):
    """δ_prev written over A_prev (sigmoid: the mask reads A_prev first) and over Z_prev (relu, float32 δ_prev), and
    every array one element off alignment."""
    N, n_in, n_out = 21, 18, 10
    delta = rng.standard_normal((N, n_out)).astype(np.float32)
    W = rng.standard_normal((n_out, n_in)).astype(np.float32)
    Z_prev = rng.standard_normal((N, n_in)).astype(np.float32)
    d_dev = stored(delta, precision, 1)
    product = prec.reference_gemm(decode(d_dev, precision), W.T, precision).astype(np.float64)
    bound = tc_tol(decode(d_dev, precision), W.T, precision)
    A_prev = stored(acts.forward(acts.SIGMOID, Z_prev.copy()), precision, 1)
    a = decode(A_prev, precision).astype(np.float64)
    expected = (product * (a * (1 - a))).astype(np.float32)
    backend.input_grad_masked(d_dev, W, stored(Z_prev, "fp32", 1), A_prev, acts.SIGMOID, 0.1, A_prev,
                              precision=precision)
    fmt = stored_format(precision)
    assert_within(decode(A_prev, fmt), prec.round_operand(expected, fmt),
                  0.25 * bound + format_ulp(expected, fmt) + 2 * U32 * np.abs(expected), "δ_prev = A_prev")
    Z_dev = stored(Z_prev, "fp32", 1)
    backend.input_grad_masked(d_dev, W, Z_dev, poisoned((N, n_in), np.float32), acts.RELU, 0.1, Z_dev,
                              precision=precision)
    assert_within(Z_dev, product * (Z_prev > 0), bound + U32 * np.abs(product), "δ_prev = Z_prev")


# ---- weight_grad ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_weight_grad(backend, precision, shape, rng):
    """dW = round_p(δ)ᵀ·round_p(A_prev) and db = Σₙ δₙ of the stored δ (the batch of 1031 split over slices),
    overwrite then accumulate (db left alone when None); A_prev stored, or layer 0's float32 X."""
    N, n_in, n_out = shape
    case = SHAPES.index(shape)
    d_dev = stored(rng.standard_normal((N, n_out)).astype(np.float32), precision)
    X = rng.standard_normal((N, n_in)).astype(np.float32)
    a_prev = stored(X, precision) if case % 2 else X
    delta = decode(d_dev, precision)
    dW, db = poisoned((n_out, n_in), np.float32), poisoned(n_out, np.float32)
    backend.weight_grad(d_dev, a_prev, dW, db, precision=precision)
    dW_ref = prec.reference_gemm(delta.T, X.T, precision).astype(np.float64)
    bound = tc_tol(delta.T, X.T, precision)
    db_ref = delta.astype(np.float64).sum(axis=0)
    db_bound = (N + 1) * U32 * np.abs(delta).astype(np.float64).sum(axis=0)
    assert_within(dW, dW_ref, bound + U32 * np.abs(dW_ref), "dW")
    assert_within(db, db_ref, db_bound, "db")
    if N > 1000:
        return   # accumulation on the smaller shapes (emulation time); the split slices add through one reduce
    backend.weight_grad(d_dev, a_prev, dW, None, accumulate=True, precision=precision)
    assert_within(dW, 2 * dW_ref, 2 * bound + 3 * U32 * np.abs(dW_ref), "dW accumulated")
    assert_within(db, db_ref, db_bound, "db untouched")
    backend.weight_grad(d_dev, a_prev, dW, db, accumulate=True, precision=precision)
    assert_within(dW, 3 * dW_ref, 3 * bound + 6 * U32 * np.abs(dW_ref), "dW accumulated twice")
    assert_within(db, 2 * db_ref, 2 * db_bound + U32 * np.abs(db_ref), "db accumulated")


def test_weight_grad_is_the_same_bits_under_every_schedule(backend, emulator, rng):
    """Split K and db from the shared tiles, no atomics: the emulator's thread and block order changes nothing."""
    d_dev = stored(rng.standard_normal((520, 140)).astype(np.float32), "bf16")   # 2 slices, 2 row tiles of dW
    a_dev = stored(rng.standard_normal((520, 20)).astype(np.float32), "bf16")
    results = []
    try:
        for seed in (1, 2):
            emulator_module.set_seed(emulator, seed)
            dW, db = poisoned((140, 20), np.float32), poisoned(140, np.float32)
            backend.weight_grad(d_dev, a_dev, dW, db, precision="bf16")
            results.append((dW, db))
    finally:
        emulator_module.set_seed(emulator, 0)
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_wrong_storage_is_refused(backend):
    X = np.zeros((3, 4), np.float32)
    with pytest.raises(TypeError, match="bf16"):
        backend.dense_forward(X.astype(np.float16), np.zeros((2, 4), np.float32), None, 0, 0.1,
                              np.zeros((3, 2), np.float32), np.zeros((3, 2), np.float32), precision="bf16")
    with pytest.raises(TypeError, match="A"):
        backend.dense_forward(X, np.zeros((2, 4), np.float32), None, 0, 0.1, np.zeros((3, 2), np.float32),
                              np.zeros((3, 2), np.uint16), precision="tf32")
    with pytest.raises(ValueError, match="precision"):
        backend.input_grad(X, np.zeros((4, 2), np.float32), np.zeros((3, 2), np.float32), precision="fp8")


# ---- loss_grad: a stored and scaled δ ------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("loss", list(losses.NAMES.values()), ids=list(losses.NAMES))
def test_loss_grad_stored_and_scaled(backend, precision, loss, rng):
    """δ_out = store(S·∂L/∂Z) in δ's storage, the loss and A float32 and unscaled; S = 2^16 (fp16's scaler), 1 (None)."""
    N, C = 37, 5
    Z = (3 * rng.standard_normal((N, C))).astype(np.float32)
    y = np.eye(C)[rng.integers(0, C, N)] if loss == losses.SOFTMAX_CE else rng.random((N, C))
    y = y.astype(np.float32)
    act = losses.REQUIRED_ACTIVATION[loss]
    act = acts.TANH if act is None else act
    A_ref, delta_ref = np.empty((N, C), np.float32), np.empty((N, C), np.float32)
    L_ref = losses.loss_grad(loss, act, 0.1, Z, y, A_ref, delta_ref)
    for scale in (None, LS.INIT_SCALE):
        A, loss_out = poisoned((N, C), np.float32), poisoned(1, np.float32)
        delta = poisoned((N, C), backend.storage_dtype(precision))
        backend.loss_grad(loss, act, 0.1, Z, y, A, delta, loss_out,
                          scale=None if scale is None else np.array([scale]))
        np.testing.assert_allclose(loss_out[0], L_ref, rtol=1e-5)
        np.testing.assert_allclose(A, A_ref, rtol=1e-5, atol=1e-7)
        # δ from the kernel's own A (the emulator's expf/tanhf and numpy's may differ by an ulp, which A − y
        # would magnify), in float32 as the kernel forms it, scaled and rounded once
        if loss == losses.MSE:
            unscaled = acts.derivative_mask(act, (A - y) / np.float32(N), Z, A, 0.1)
        else:
            unscaled = (A - y) / np.float32(N * C if loss == losses.BCE else N)
        expected = unscaled.astype(np.float64) * (scale or 1)
        fmt = stored_format(precision)
        assert_within(decode(delta, fmt), prec.round_operand(expected, fmt),
                      format_ulp(expected, fmt) + 4 * U32 * np.abs(expected), f"δ (scale {scale})")


def test_loss_grad_scaled_overflows_to_inf_in_fp16(backend):
    """A scale too large for fp16 gives inf in δ (what the scaler detects), never a wrapped or saturated value."""
    Z, y = np.array([[3.0, -2.0]], np.float32), np.array([[0.0, 1.0]], np.float32)
    delta, A, loss_out = poisoned((1, 2), np.float16), poisoned((1, 2), np.float32), poisoned(1, np.float32)
    backend.loss_grad(losses.MSE, acts.IDENTITY, 0.1, Z, y, A, delta, loss_out, scale=np.array([2.0**20]))
    np.testing.assert_array_equal(delta, [[np.inf, -np.inf]])
    assert np.isfinite(loss_out).all()


# ---- the fp16 loss scaler: unscale_gradients, update_scale ----------------------------------------------------------
def reference_unscale(loss_value, grads, scaler, guard):
    """gpubp/base.py's unscale_gradients on host arrays (the numpy backend's rule, written out)."""
    if guard[G.FAULT]:
        guard[G.SKIPPED] += 1
    elif not np.isfinite(loss_value):
        guard[G.FAULT], guard[G.FAULT_STEP], guard[G.FAULT_INDEX] = G.LOSS, guard[G.STEP], -1
    else:
        grads *= np.float32(1.0 / scaler[LS.SCALE])
        bad = np.flatnonzero(~np.isfinite(grads))
        if bad.size:
            guard[G.FAULT], guard[G.FAULT_STEP], guard[G.FAULT_INDEX] = G.OVERFLOW, guard[G.STEP], bad[0]


def fresh_guard(steps, fault=G.NONE):
    guard = np.full(G.SIZE, np.nan)
    guard[:G.RING] = G.fresh(steps)
    guard[G.FAULT] = fault
    return guard


# with one SM the scan's grid is 32 blocks of 256 threads: index 8197 is thread 5's second element (after 5: a
# thread keeps its first), 301 and 300 two lanes of one warp (the warp keeps the smaller)
@pytest.mark.parametrize("size, bad", [(1, []), (33, [32, 17]), (20011, [20010, 8197, 301, 300]),
                                       (20011, [20010, 8197, 5]), (1031, [])], ids=str)
def test_unscale_gradients(backend, monkeypatch, size, bad, rng):
    """grads *= 1/S in place and the smallest non-finite index as OVERFLOW; a non-finite loss (LOSS) or a fault
    set before (SKIPPED += 1) leave the gradients alone; guard for guard with the reference."""
    monkeypatch.setattr(cb, "_sm_count", lambda: 1)
    grads = (rng.standard_normal(size) * 2.0**16).astype(np.float32)
    grads[bad] = np.resize([np.inf, np.nan, -np.inf], len(bad))
    scaler = LS.fresh()
    for loss_value, fault in ((0.5, G.NONE), (np.nan, G.NONE), (0.5, G.GRADIENT)):
        g, guard = grads.copy(), fresh_guard(7, fault)
        g_ref, guard_ref = grads.copy(), guard.copy()
        backend.unscale_gradients(np.array([loss_value], np.float32), g, scaler.copy(), guard)
        reference_unscale(loss_value, g_ref, scaler, guard_ref)
        np.testing.assert_array_equal(g, g_ref)
        np.testing.assert_array_equal(guard, guard_ref)
        assert (backend._bad_index() == cb._NO_INDEX).all()
    assert guard[G.SKIPPED] == 1


def test_update_scale_follows_loss_scale_update(backend):
    """A run of steps, each good or an overflow, against gpubp.loss_scale.update: back-off, growth every interval,
    the cap MAX_SCALE, the OVERFLOW fault cleared, any other fault left alone."""
    scaler = LS.fresh(scale=2.0**98, growth_interval=3)
    reference = scaler.copy()
    pattern = [False, False, False, True, False, False, False, False, False, False, False, True, True] + [False] * 9
    for overflow in pattern:
        guard = fresh_guard(5, G.OVERFLOW if overflow else G.NONE)
        guard[G.FAULT_STEP], guard[G.FAULT_INDEX] = (5, 12) if overflow else (0, -1)
        backend.update_scale(scaler, guard)
        LS.update(reference, overflow)
        np.testing.assert_array_equal(scaler, reference)
        assert guard[G.FAULT] == G.NONE and guard[G.FAULT_INDEX] == -1
        assert guard[G.STEP] == 5 + overflow and guard[G.FAULT_STEP] == 0   # an overflow step counts as taken
    assert scaler[LS.SCALE] == LS.MAX_SCALE and scaler[LS.OVERFLOWS] == 3
    guard = fresh_guard(5, G.PARAMS)
    before_guard, before_scaler = guard.copy(), scaler.copy()
    backend.update_scale(scaler, guard)
    np.testing.assert_array_equal(guard, before_guard)
    np.testing.assert_array_equal(scaler, before_scaler)


def test_loss_scale_layout_matches_the_kernels():
    import re
    text = cuda_sources.read_kernel_file("loss_scale.cu")
    values = dict(re.findall(r"\bSCALER_([A-Z_]+) = (\d+)", text))
    for name in ("SCALE", "GOOD", "OVERFLOWS", "GROWTH_INTERVAL", "GROWTH", "BACKOFF"):
        assert int(values[name]) == getattr(LS, name), name
    assert int(values["SIZE"]) == LS.SIZE
    assert float(re.search(r"#define LOSS_SCALE_MAX ([\d.e]+)", text).group(1)) == LS.MAX_SCALE
    assert re.search(r"FAULT_OVERFLOW = (-\d+)", cuda_sources.read_kernel_file("guard.cuh")).group(1) == str(G.OVERFLOW)


# ---- whole networks against the numpy backend in the same precision --------------------------------------------
def _net(backend_obj, precision, sizes=(7, 33, 17, 3), hidden="tanh", fused="auto"):
    import gpubp
    layers = [gpubp.Dense(a, b, hidden if i < len(sizes) - 2 else "identity")
              for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]
    return gpubp.Sequential(*layers, backend=backend_obj, dtype="float32", seed=3, precision=precision, fused=fused)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_network_gradients_and_steps_match_the_numpy_backend(backend, precision, rng):
    """gradients() of a 3-layer net (16-bit hidden A and δ for bf16/fp16: every op of the contract, X converted,
    the loss scaler for fp16) against NumpyBackend in the same precision, as tight as the reference's own test
    against the contract (2e-3 of the largest gradient: the odd 16-bit rounding that goes the other way); then
    four Adam steps, loss by loss, with fp16's scaler state the same."""
    import gpubp
    from gpubp.backends.numpy_backend import NumpyBackend
    X = rng.standard_normal((37, 7))
    y = rng.integers(0, 3, 37)
    backend.use_graphs = True   # whatever GPUBP_CUDA_GRAPHS says: the capture is part of what is checked
    nets = {"cupy": _net(backend, precision), "numpy": _net(NumpyBackend(), precision)}
    grads = {k: net.gradients(X, y, loss="softmax_ce") for k, net in nets.items()}
    for got, want in zip(grads["cupy"], grads["numpy"]):
        for key in want:
            assert np.abs(got[key] - want[key]).max() <= 2e-3 * np.abs(want[key]).max(), key
    curves = {}
    for k, net in nets.items():
        opt = gpubp.Adam(net, lr=1e-2)
        curves[k] = [net.train_step(X, y, "softmax_ce", opt) for _ in range(4)]
    np.testing.assert_allclose(curves["cupy"], curves["numpy"], rtol=2e-3)
    # the steps after the first replayed a captured CUDA graph (the emulator records the launches, then replays
    # them): conversions into scratch, the scaler's kernels and all
    assert not backend.graph_errors
    assert any(isinstance(state, tuple) for state in backend._steps.values())
    for got, want in zip(nets["cupy"].get_params(), nets["numpy"].get_params()):
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=2e-2, atol=2e-3 * np.abs(want[key]).max())
    if precision == "fp16":
        assert nets["cupy"].loss_scale == nets["numpy"].loss_scale


def test_fp16_overflow_backs_off_as_the_numpy_backend(backend, rng):
    """A scale of 2^24 overflows the stored fp16 δ: on both backends the same steps are skipped (counted, no
    update), the scale halves each time, then training goes on; parameters agree at the end."""
    import gpubp
    from gpubp import loss_scale
    from gpubp.backends.numpy_backend import NumpyBackend
    X = rng.standard_normal((9, 7))
    y = rng.integers(0, 3, 9)
    seen = {}
    for name, be in (("cupy", backend), ("numpy", NumpyBackend())):
        net = _net(be, "fp16", sizes=(7, 16, 3))
        opt = gpubp.SGD(net, lr=1e-2)
        net.backend.copy_into(net.scaler, loss_scale.fresh(scale=2.0**24))
        losses_seen = [net.train_step(X, y, "softmax_ce", opt) for _ in range(12)]
        seen[name] = (net.loss_scale, net.steps, losses_seen, net.get_params())
    assert seen["cupy"][0] == seen["numpy"][0] and 2 <= seen["cupy"][0][1] < 12   # (scale, overflows)
    assert seen["cupy"][1] == seen["numpy"][1] == 12
    np.testing.assert_allclose(seen["cupy"][2], seen["numpy"][2], rtol=2e-3)
    for got, want in zip(seen["cupy"][3], seen["numpy"][3]):
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=2e-2, atol=1e-3)


def _per_gemm_weights(net):
    """The model as before the shared 16-bit copy: every GEMM converts the float32 W itself (into scratch)."""
    net.params16 = None
    for layer in net.layers:
        layer.W16 = None
    return net


class _CountedKernel:
    """A kernel that notes (name, size) of each to_storage_kernel launch (size: its last argument) in `log`."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __call__(self, grid, block, args):
        if self.name.startswith("to_storage_kernel"):
            self.log.append(int(args[-1]))
        return self.kernel(grid, block, args)


@pytest.mark.parametrize("precision, sizes", [("bf16", (7, 33, 17, 3)), ("fp16", (7, 5, 3))])
def test_a_step_rounds_the_weights_once_bit_identical_to_per_gemm_rounding(backend, precision, sizes, monkeypatch,
                                                                             rng):
    """bf16/fp16, the per-layer path: a train step converts W once, all of the flat parameters in one
    to_storage_kernel launch (round_to_storage into the model's 16-bit copy), instead of once per GEMM that reads it
    (forward, and input_grad for every layer but the first); X is converted by the two GEMMs that read it, as
    before. Parameters and losses after steps that include a CUDA graph's replay are bit-identical to the per-GEMM
    conversion's. Widths 7, 33, 17, 5 make rows of W that are not 16 bytes (8 elements) long: the tensor-core
    kernels' element-by-element loads."""
    import gpubp
    X = rng.standard_normal((37, sizes[0]))
    y = rng.integers(0, sizes[-1], 37)
    real_kernel = cb._kernel   # the emulator's (the fixture's patch)
    log = []
    monkeypatch.setattr(cb, "_kernel", lambda filename, name: _CountedKernel(real_kernel(filename, name), name, log))
    nets = {"shared": _net(backend, precision, sizes, fused=False),
            "per GEMM": _per_gemm_weights(_net(backend, precision, sizes, fused=False))}
    conversions = {}
    backend.use_graphs = False   # launches counted eagerly (a replayed graph looks up no kernels)
    for name, net in nets.items():
        del log[:]
        net.train_step(X, y, "softmax_ce", gpubp.SGD(net, lr=1e-2))
        conversions[name] = list(log)
    layers = len(sizes) - 1
    # the weights, then X (float32) as layer 0's forward and weight_grad read it, each converting it as before
    assert conversions["shared"] == [nets["shared"].layout.size, X.size, X.size]
    assert sorted(conversions["per GEMM"]) == sorted([X.size] * 2 + [a * b for a, b in zip(sizes, sizes[1:])]
                                                     + [a * b for a, b in zip(sizes[1:-1], sizes[2:])])
    assert len(conversions["per GEMM"]) == 2 + 2 * layers - 1
    backend.use_graphs = True
    curves, params = {}, {}
    for name, net in nets.items():
        opt = gpubp.Adam(net, lr=1e-2)
        curves[name] = [net.train_step(X, y, "softmax_ce", opt) for _ in range(3)]
        params[name] = net.get_params()
    assert not backend.graph_errors
    assert any(isinstance(state, tuple) for state in backend._steps.values())   # the third step a graph's replay
    assert curves["shared"] == curves["per GEMM"]
    for got, want in zip(params["shared"], params["per GEMM"]):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    np.testing.assert_array_equal(nets["shared"].predict(X), nets["per GEMM"].predict(X))


def test_odd_widths_match_the_numpy_backend(backend, rng):
    """7-5-3 in bf16 on the per-layer path: W rows of 7 and 5 elements (not 16-byte aligned) read from the 16-bit
    copy give the numpy reference's gradients (test_network_gradients_and_steps_match_the_numpy_backend's tolerance)
    and, after a step moved the weights, its predictions."""
    import gpubp
    from gpubp.backends.numpy_backend import NumpyBackend
    X = rng.standard_normal((19, 7))
    y = rng.integers(0, 3, 19)
    nets = {name: _net(be, "bf16", (7, 5, 3), fused=False)
            for name, be in (("cupy", backend), ("numpy", NumpyBackend()))}
    grads = {k: net.gradients(X, y, loss="softmax_ce") for k, net in nets.items()}
    for got, want in zip(grads["cupy"], grads["numpy"]):
        for key in want:
            assert np.abs(got[key] - want[key]).max() <= 2e-3 * np.abs(want[key]).max(), key
    for net in nets.values():
        net.train_step(X, y, "softmax_ce", gpubp.SGD(net, lr=0.5))
    np.testing.assert_allclose(nets["cupy"].predict(X), nets["numpy"].predict(X), rtol=2e-2, atol=2e-3)


def test_gemm_tc_bench_row_says_why_it_skips_without_a_gpu(capsys):
    """bench/gemm_tc.py (ours against cuBLAS in each precision) is GPU-only: elsewhere it exits 77 (gpu_check's
    "skipped") and says why."""
    if cb.available()[0] and getattr(cb.cp, "cuda", None) is not None and hasattr(cb.cp.cuda, "Event"):
        pytest.skip("a GPU is here: the row runs (python -m bench.gemm_tc)")
    from bench import gemm_tc
    assert gemm_tc.main(["--n", "64"]) == 77
    assert "skipped, no GPU" in capsys.readouterr().out
