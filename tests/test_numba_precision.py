"""The numba backend's reduced precisions (issue 12) against the numpy reference of the same precision, under the
CUDA simulator in CI (tests/run.sh, marker numba) and on a GPU.

What backends/base.py's contract asks of a precision p (tf32, bf16, fp16), op by op:
    operands rounded to p as they are loaded (bit for bit as precision.round_operand), float32 accumulation
    (within γ_K = K·2⁻²⁴ of the exact product of the rounded operands, precision.reference_gemm), every output
    stored once in its array's dtype (within one unit of the stored format's last place of the reference's
    float32 value: float32 epilogue arithmetic may differ from numpy's in the last float32 bit, which moves a
    value across a 16-bit rounding boundary at most to the neighbouring 16-bit number);
    db from the stored δ; loss_grad's δ = store(S·∂L/∂Z); unscale_gradients and update_scale as
    gpubp/loss_scale.py's rule, with guard code OVERFLOW.
Every output is poisoned (NaN, or a bfloat16 NaN pattern) before its kernel runs, so an element a kernel leaves
unwritten fails. Sizes: 1, 7 and 33 (across the simulator's 16-wide tiles) and one larger."""
import numpy as np
import pytest

import gpubp
from gpubp import activations as acts
from gpubp import guard as G
from gpubp import loss_scale as S
from gpubp import losses
from gpubp import precision as P

numba_backend = pytest.importorskip("gpubp.backends.numba_backend")
from gpubp.backends import numba_kernels as K  # noqa: E402
from gpubp.backends import numba_loop_kernels as L  # noqa: E402
from numba import cuda  # noqa: E402

pytestmark = pytest.mark.numba
needs_numba = pytest.mark.skipif(not numba_backend.available()[0], reason=numba_backend.available()[1])

REDUCED = ("tf32", "bf16", "fp16")
ACT_NAMES = {v: k for k, v in acts.NAMES.items()}
U32 = 2.0 ** -24   # float32's unit roundoff


@pytest.fixture(scope="module")
def be():
    if not numba_backend.available()[0]:
        pytest.skip(numba_backend.available()[1])
    return gpubp.get_backend("numba")


def poisoned(be, shape, dtype):
    """A device array of `shape` and `dtype` full of NaN (uint16: the bfloat16 NaN 0xFFFF), so that an element
    no kernel writes shows."""
    dtype = np.dtype(dtype)
    fill = np.full(shape, 0xFFFF, np.uint16) if dtype == np.uint16 else np.full(shape, np.nan, dtype)
    return be.asarray(fill, dtype)


def stored(be, x, precision):
    """x (float32 values) as a device array of the precision's storage, rounded as the reference rounds."""
    host = np.asarray(x, np.float32)
    bits = P.to_storage(host, precision)
    return be.asarray(bits.view(np.float16) if precision == "fp16" else bits, be.storage_dtype(precision))


def host(be, x, precision):
    """A device array's float32 values (16-bit storage decoded)."""
    return P.decode(be.to_numpy(x), precision)


def assert_one_ulp(actual, expected, precision, what, slack=0.0):
    """actual (a stored output, decoded) is the precision's rounding of a float32 within one unit in the last
    place of the stored format of `expected` (the reference's float32 value, unrounded): |a − e| ≤ 2^(1−t)·|e|
    plus fp16's subnormal spacing, t the significand bits (and `slack`, an absolute bound on how far the float32
    value the kernel rounds may lie from the reference's). NaN where expected is NaN."""
    t = P.SIGNIFICAND_BITS["fp32" if precision == "tf32" else precision]   # tf32 stores float32
    tiny = 2.0 ** -24 if precision == "fp16" else 1e-38
    bound = 2.0 ** (1 - t) * (np.abs(expected) + slack) + slack + tiny
    assert np.array_equal(np.isnan(actual), np.isnan(expected)), f"{what}: NaN where the reference has none"
    err = np.abs(actual.astype(np.float64) - expected)
    assert np.all(err[~np.isnan(expected)] <= bound[~np.isnan(expected)]), (
        f"{what}: off by {np.nanmax(err / bound):.3g} of the bound (one ulp of {precision})")


def assert_gemm_close(actual, reference, absprod, K_, what):
    """A float32-accumulated GEMM of rounded operands against precision.reference_gemm: within γ_K·(|A|·|B|)."""
    assert not np.isnan(actual).any(), f"{what}: an element left unwritten (NaN poison)"
    bound = 1.01 * K_ * U32 * absprod + 1e-30
    err = np.abs(actual.astype(np.float64) - reference)
    assert np.all(err <= bound), f"{what}: off by {np.max(err / bound):.3g} of γ_K·|A|·|B|"


# ---- storage and rounding --------------------------------------------------------------------------------------
def test_storage_dtypes(be):
    assert be.storage_dtype("fp32") == np.float32 and be.storage_dtype("tf32") == np.float32
    assert be.storage_dtype("fp16") == np.float16
    assert be.storage_dtype("bf16") == np.uint16      # raw bfloat16 bits: precision.decode reads them
    with pytest.raises(ValueError, match="precision"):
        be.storage_dtype("fp8")


# float32 bit patterns where rounding is easy to get wrong: ties (even and odd kept part) at bit 13 (tf32) and
# bit 16 (bf16), just above and below them, carries into the exponent, overflow to inf at each format's top,
# inf, NaNs with their payload only in the dropped bits (a sloppy rounding makes them inf) and negative, zeros,
# float32 subnormals, and fp16's ties, top (65504, 65519.99, 65520) and subnormals.
EDGE_BITS = [
    0x3F800000, 0x3F801000, 0x3F803000, 0x3F801001, 0x3F800FFF,     # 1.0, tf32 ties (even, odd), off-tie
    0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0xBF818000,     # bf16 ties (even, odd), off-tie, negative
    0x3FFFFFFF, 0x3FFFF000, 0x3FFF8000,                              # carries into the exponent
    0x7F7FFFFF, 0x7F7FF000, 0x7F7FEFFF, 0x7F7F8000, 0x7F7F7FFF,      # FLT_MAX and the tf32/bf16 overflow edge
    0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFF800001, 0x7F812345, 0xFFFFFFFF, 0x7FA00000,
    0x00000000, 0x80000000, 0x00000001, 0x00008000, 0x00018000, 0x00001000, 0x00003000, 0x807FFFFF,
    0x477FE000, 0x477FEFFF, 0x477FF000, 0x47800000, 0x3F802000, 0x3F806000,   # fp16: 65504, …, 65520, ties
    0x33000000, 0x33400000, 0x33C00000, 0x387FC000, 0x38800000,      # 2⁻²⁵ (tie to 0), fp16 subnormals, min normal
]


def _edge_values(rng):
    random = (rng.standard_normal(24) * np.exp2(rng.integers(-20, 20, 24))).astype(np.float32)
    return np.concatenate([np.array(EDGE_BITS, np.uint32).view(np.float32), random])


@cuda.jit
def round_all_kernel(x, tf32, bf16_stored, bf16, fp16):
    """Each rounding device function of numba_kernels over x (one thread an element)."""
    i = cuda.grid(1)
    if i < x.size:
        tf32[i] = K.round_tf32(x[i])
        bf16_stored[i] = K.bf16_bits(x[i])
        bf16[i] = K.bf16_value(bf16_stored[i])
        fp16[i] = K.round_fp16(x[i])


@needs_numba
def test_rounding_is_the_references_bit_for_bit(rng):
    """round_tf32, bf16_bits/bf16_value and round_fp16 (the device functions every kernel rounds with) give
    precision.round_operand's (and to_storage's) bits on every edge value: RNE, overflow to inf, NaN made
    quiet (bf16: 0x7FC0 | sign, as ml_dtypes)."""
    x = _edge_values(rng)
    out = [cuda.device_array(x.size, dt) for dt in (np.float32, np.uint16, np.float32, np.float32)]
    numba_backend._QuietLaunch(round_all_kernel)[1, x.size](cuda.to_device(x), *out)
    tf32, bits, bf16, fp16 = (o.copy_to_host() for o in out)
    with np.errstate(over="ignore", invalid="ignore"):
        np.testing.assert_array_equal(tf32.view(np.uint32), P.round_operand(x, "tf32").view(np.uint32))
        np.testing.assert_array_equal(bits, P.to_storage(x, "bf16"))
        np.testing.assert_array_equal(bf16.view(np.uint32), P.round_operand(x, "bf16").view(np.uint32))
        ref16 = P.round_operand(x, "fp16")
    # fp16 NaN payloads are the conversion's (numpy keeps them; a GPU's cvt makes them canonical): NaN-ness only
    nan = np.isnan(ref16)
    np.testing.assert_array_equal(np.isnan(fp16), nan)
    np.testing.assert_array_equal(fp16[~nan].view(np.uint32), ref16[~nan].view(np.uint32))


@needs_numba
@pytest.mark.parametrize("precision", REDUCED)
def test_operands_are_rounded_as_loaded_and_outputs_stored_once(be, precision, rng):
    """Through the real forward kernel, identity, no bias: X (n, 1) · W with W = [[1 + 2⁻⁷]] (exact in every
    format) gives Z = round_p(X)·W, an exact float32 product (at most 8 + 11 significant bits) except where it
    overflows or is subnormal, rounded then as numpy rounds it: bit for bit. A = store(Z) is then the storage's
    own RNE rounding of that float32 (not exact in the format: the store path's rounding shows), bit for bit."""
    x = _edge_values(rng)
    w = np.float32(1 + 2.0 ** -7)
    X, W = be.asarray(x[:, None], np.float32), be.asarray(np.full((1, 1), w), np.float32)
    Z, A = poisoned(be, (x.size, 1), np.float32), poisoned(be, (x.size, 1), be.storage_dtype(precision))
    be.dense_forward(X, W, None, acts.IDENTITY, 0.0, Z, A, precision=precision)
    with np.errstate(over="ignore", invalid="ignore"):
        ref_z = np.float32(0) + P.round_operand(x, precision) * w   # the sum starts at +0: −0 comes out +0
    z, a = be.to_numpy(Z)[:, 0], be.to_numpy(A)[:, 0]
    nan = np.isnan(ref_z)
    np.testing.assert_array_equal(np.isnan(z), nan)
    np.testing.assert_array_equal(z[~nan].view(np.uint32), ref_z[~nan].view(np.uint32))
    with np.errstate(over="ignore", invalid="ignore"):
        ref_a = P.to_storage(z, precision)      # the kernel's own Z, stored as the reference stores a float32
    if precision == "fp16":                     # NaN payloads are the conversion's own: NaN-ness only
        np.testing.assert_array_equal(np.isnan(a), nan)
        a, ref_a = a[~nan].view(np.uint16), ref_a[~nan]
    np.testing.assert_array_equal(a.view(ref_a.dtype), ref_a)


# ---- the GEMM ops ------------------------------------------------------------------------------------------------
# (N, in, out) and the hidden activation: g' from the stored A_prev (tanh) and from Z_prev (leaky_relu), each
# at a size inside one simulator tile and one across tiles, per precision (both at every size would double the
# simulator's time for no new path)
SHAPES = [(1, 1, 1, acts.TANH), (7, 33, 7, acts.LEAKY_RELU), (33, 7, 33, acts.TANH), (40, 20, 17, acts.LEAKY_RELU)]


@needs_numba
@pytest.mark.parametrize("precision", REDUCED)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{i}x{o}-{ACT_NAMES[a]}" for n, i, o, a in SHAPES])
def test_a_hidden_layer_forward_and_backward_match_the_reference(be, precision, shape, rng):
    """A layer between the staged X (float32) and a hidden layer (storage), and the next one from that hidden A
    to a float32 output, forward and backward: dense_forward (both ways), weight_grad and db (from the stored δ,
    with A_prev float32 and stored), input_grad_masked (g' from Z_prev for leaky_relu and from the stored A_prev
    for tanh), each against the reference of the same precision."""
    N, n_in, n_out, act = shape
    alpha = 0.1 if act == acts.LEAKY_RELU else 0.0
    sd, f32 = be.storage_dtype(precision), np.float32
    X = rng.standard_normal((N, n_in)).astype(f32)
    W1, b1 = rng.standard_normal((n_out, n_in)).astype(f32), rng.standard_normal(n_out).astype(f32)
    W2 = rng.standard_normal((3, n_out)).astype(f32)
    d2 = P.round_operand(rng.standard_normal((N, 3)), precision)               # the next layer's stored δ
    # forward: X (float32) -> Z1 (float32), A1 (storage)
    Z1, A1 = poisoned(be, (N, n_out), f32), poisoned(be, (N, n_out), sd)
    be.dense_forward(be.asarray(X, f32), be.asarray(W1, f32), be.asarray(b1, f32), act, alpha, Z1, A1,
                     precision=precision)
    z1 = be.to_numpy(Z1)
    absprod = np.abs(P.round_operand(X, precision)) @ np.abs(P.round_operand(W1, precision)).T
    assert_gemm_close(z1, P.reference_gemm(X, W1, precision).astype(np.float64) + b1, absprod + np.abs(b1),
                      n_in + 1, f"{precision} Z")
    a1 = host(be, A1, precision)
    assert_one_ulp(a1, acts.forward(act, z1, alpha), precision, f"{precision} A = store(g(Z))")
    # forward from the stored A1 to a float32 output A2 (the output layer)
    Z2, A2 = poisoned(be, (N, 3), f32), poisoned(be, (N, 3), f32)
    be.dense_forward(A1, be.asarray(W2, f32), None, acts.SIGMOID, 0.0, Z2, A2, precision=precision)
    z2 = be.to_numpy(Z2)
    assert_gemm_close(z2, P.reference_gemm(a1, W2, precision), np.abs(a1) @ np.abs(P.round_operand(W2, precision)).T,
                      n_out, f"{precision} Z from a stored A_prev")
    np.testing.assert_allclose(be.to_numpy(A2), acts.forward(acts.SIGMOID, z2), rtol=4 * U32, atol=1e-30)
    # backward: δ2 (storage) -> dW2 from the stored A1, db2 from the stored δ2
    D2 = stored(be, d2, precision)
    dW2, db2 = poisoned(be, (3, n_out), f32), poisoned(be, (3,), f32)
    be.weight_grad(D2, A1, dW2, db2, precision=precision)
    assert_gemm_close(be.to_numpy(dW2), P.reference_gemm(d2.T, a1.T, precision), np.abs(d2).T @ np.abs(a1), N,
                      f"{precision} dW from stored operands")
    assert_gemm_close(be.to_numpy(db2), d2.astype(np.float64).sum(0), np.abs(d2).sum(0), N, f"{precision} db")
    # δ1 = store((δ2 · W2) ⊙ g'(Z1 or A1)) into storage
    D1 = poisoned(be, (N, n_out), sd)
    be.input_grad_masked(D2, be.asarray(W2, f32), Z1, A1, act, alpha, D1, precision=precision)
    product = P.reference_gemm(d2, W2.T, precision).astype(np.float64)
    mask = acts.derivative_mask(act, np.ones_like(z1), z1, a1, alpha).astype(np.float64)
    d1 = host(be, D1, precision)
    reach = (np.abs(d2) @ np.abs(P.round_operand(W2, precision))) * np.abs(mask)
    # the GEMM's float32 error (γ_K, K = 3), then one ulp of the stored format around the reference
    assert not np.isnan(d1).any(), f"{precision} δ_prev: an element left unwritten"
    err = np.abs(d1 - product * mask)
    t = P.SIGNIFICAND_BITS["fp32" if precision == "tf32" else precision]
    bound = 1.01 * 3 * U32 * reach + 2.0 ** (1 - t) * (np.abs(product * mask) + 1.01 * 3 * U32 * reach)
    bound += 2.0 ** -24 if precision == "fp16" else 1e-38
    assert np.all(err <= bound), f"{precision} δ_prev: off by {np.max(err / bound):.3g} of the bound"
    # dW1 from the stored δ1 and the float32 X (rounded as loaded), accumulated onto what dW1 and db1 hold
    base_W, base_b = rng.standard_normal((n_out, n_in)).astype(f32), rng.standard_normal(n_out).astype(f32)
    dW1, db1 = be.asarray(base_W, f32), be.asarray(base_b, f32)
    be.weight_grad(D1, be.asarray(X, f32), dW1, db1, accumulate=True, precision=precision)
    xr = P.round_operand(X, precision)
    assert_gemm_close(be.to_numpy(dW1), base_W + P.reference_gemm(d1.T, X.T, precision).astype(np.float64),
                      np.abs(d1).T @ np.abs(xr) + np.abs(base_W), N + 1, f"{precision} dW += from a float32 A_prev")
    assert_gemm_close(be.to_numpy(db1), base_b + d1.astype(np.float64).sum(0), np.abs(d1).sum(0) + np.abs(base_b),
                      N + 1, f"{precision} db +=")


@needs_numba
@pytest.mark.parametrize("precision", REDUCED)
def test_unfused_ops_match_the_numpy_backend(be, precision, rng):
    """The two ops a network does not launch but the interface has, into 16-bit outputs, against the numpy
    backend's ops in the same precision: input_grad (dA_prev = store(round(δ)·round(W))) and activation_mask
    (δ = store(dA ⊙ g'(Z)) from a stored dA and A; tanh's g' from A, sigmoid's too)."""
    from gpubp.backends.numpy_backend import NumpyBackend
    ref = NumpyBackend()
    N, n_in, n_out = 7, 33, 5
    sd = be.storage_dtype(precision)
    host_storage = P.storage_dtype(precision)           # the numpy backend's: ml_dtypes.bfloat16, float16, float32
    as_ref = lambda x: P.round_operand(x, precision).astype(host_storage)   # noqa: E731
    d, W = P.round_operand(rng.standard_normal((N, n_out)), precision), rng.standard_normal((n_out, n_in))
    W = W.astype(np.float32)
    out = poisoned(be, (N, n_in), sd)
    be.input_grad(stored(be, d, precision), be.asarray(W, np.float32), out, precision=precision)
    want = np.empty((N, n_in), host_storage)
    ref.input_grad(as_ref(d), W, want, precision)
    got, want = host(be, out, precision), want.astype(np.float32)
    reach = np.abs(d) @ np.abs(P.round_operand(W, precision))
    t = P.SIGNIFICAND_BITS["fp32" if precision == "tf32" else precision]
    bound = 2 * 1.01 * n_out * U32 * reach * (1 + 2.0 ** (1 - t)) + 2.0 ** (1 - t) * np.abs(want)
    bound += 2.0 ** -24 if precision == "fp16" else 1e-38
    assert not np.isnan(got).any() and np.all(np.abs(got - want) <= bound), f"{precision} input_grad"
    for act in (acts.TANH, acts.SIGMOID):
        Z = rng.standard_normal((N, n_out)).astype(np.float32)
        dA, A = P.round_operand(rng.standard_normal((N, n_out)), precision), P.round_operand(
            acts.forward(act, Z), precision)
        delta = poisoned(be, (N, n_out), sd)
        be.activation_mask(stored(be, dA, precision), be.asarray(Z, np.float32), stored(be, A, precision), act,
                           0.0, delta)
        want = np.empty((N, n_out), host_storage)
        ref.activation_mask(as_ref(dA), Z, as_ref(A), act, 0.0, want)
        # g' = 1 − A² or A(1 − A): float32 in numpy, float64 here, a few float32 ulps of |dA| apart
        assert_one_ulp(host(be, delta, precision), want.astype(np.float64), precision,
                       f"{precision} activation_mask", slack=4 * U32 * np.abs(dA))


# ---- the loss gradient and the fp16 loss scaler -------------------------------------------------------------------
@needs_numba
@pytest.mark.parametrize("precision", REDUCED)
@pytest.mark.parametrize("loss,act,n_out", [(losses.MSE, acts.TANH, 1), (losses.BCE, acts.SIGMOID, 7),
                                            (losses.SOFTMAX_CE, acts.IDENTITY, 33)],
                         ids=["mse", "bce", "softmax_ce"])
def test_loss_grad_stores_the_scaled_delta(be, precision, loss, act, n_out, rng):
    """loss_grad into a stored δ: δ = store(S·∂L/∂Z) with the fp16 loss scale (S = 2¹⁵, and a scale that
    overflows fp16 for the larger δ: those are inf, as the scaler expects), else unscaled; A (float32) and the
    loss are never scaled. Against losses.loss_grad, the numpy reference, in float32."""
    N = 7
    Z = (2 * rng.standard_normal((N, n_out))).astype(np.float32)
    y = np.eye(n_out, dtype=np.float32)[rng.integers(0, n_out, N)] if loss == losses.SOFTMAX_CE else \
        (rng.random((N, n_out)) > 0.5).astype(np.float32)
    A_ref, d_ref = np.empty_like(Z), np.empty_like(Z)
    L_ref = losses.loss_grad(loss, act, 0.0, Z, y, A_ref, d_ref)
    for scale in ([None] if precision != "fp16" else [2.0 ** 15, 2.0 ** 22]):
        A, D, out = poisoned(be, Z.shape, np.float32), poisoned(be, Z.shape, be.storage_dtype(precision)), \
            poisoned(be, (1,), np.float32)
        be.loss_grad(loss, act, 0.0, be.asarray(Z, np.float32), be.asarray(y, np.float32), A, D, out,
                     scale=None if scale is None else be.asarray(np.array([scale]), np.float64))
        np.testing.assert_allclose(be.to_numpy(A), A_ref, rtol=8 * U32, atol=1e-7)
        assert float(be.to_numpy(out)[0]) == pytest.approx(L_ref, rel=1e-5)
        expected = d_ref.astype(np.float64) * (scale or 1.0)
        with np.errstate(over="ignore"):
            overflow = np.abs(P.round_operand(expected.astype(np.float32), precision)) == np.inf
        d = host(be, D, precision)
        assert np.all(np.isinf(d[overflow])) and (scale != 2.0 ** 15 or not overflow.any())
        # the kernel's epilogue (float64 arithmetic on float32 A, rounded to float32) and numpy's (float32) differ
        # by a few float32 ulps of the terms, not of δ: A − y and 1 − A² cancel, and numpy's float32 softmax
        # p = exp(log p) carries log p's rounding, |log p| ulps of p
        terms = (np.abs(A_ref) * (1 + np.abs(np.log(np.abs(A_ref) + 1e-30))) + np.abs(y)) / N * (scale or 1.0)
        assert_one_ulp(d[~overflow], expected[~overflow], precision, f"{precision} δ_out",
                       slack=8 * U32 * terms[~overflow])


def _guard(step=5):
    return np.concatenate([G.fresh(step), np.zeros(G.RING_SIZE)])


def _flags_clean(be):
    flags = be.to_numpy(be._loop_flags())
    return all(flags[slot] == L.NO_INDEX for slot in L.INDEX_SLOTS) and flags[L.TICKETS] == 0


@needs_numba
def test_unscale_gradients_divides_by_the_scale_and_reports_overflow(be, rng):
    """Over several blocks: grads ·= float32(1/S) (the numpy backend's, bit for bit); a non-finite gradient sets
    FAULT = OVERFLOW with the smallest bad index (found by a later block than the one that reports first) and
    leaves every other gradient unscaled too; a non-finite loss is a LOSS fault and touches nothing; with a
    fault already set the step only counts as skipped."""
    size = 3 * L.LOOP_THREADS * L.LOOP_MAX_BLOCKS + 5
    assert L.loop_blocks(size) > 1
    scaler = S.fresh(scale=3 * 2.0 ** 12)      # not a power of two: 1/S is rounded, as numpy rounds it
    grads = (rng.standard_normal(size) * 1e3).astype(np.float32)
    loss_ok = be.asarray(np.array([0.5]), np.float32)
    # a clean step: unscaled, no fault
    g_dev, guard = be.asarray(grads, np.float32), be.asarray(_guard(), np.float64)
    be.unscale_gradients(loss_ok, g_dev, be.asarray(scaler, np.float64), guard)
    expected = grads * np.float32(1 / scaler[S.SCALE])
    np.testing.assert_array_equal(be.to_numpy(g_dev), expected)
    assert be.to_numpy(guard)[G.FAULT] == G.NONE and _flags_clean(be)
    # overflow: inf in the second block and in a later grid-stride round; NaN later still
    bad = grads.copy()
    bad[[size - 1, L.LOOP_THREADS + 2, 2 * L.LOOP_THREADS * L.LOOP_MAX_BLOCKS + 1]] = [np.nan, np.inf, -np.inf]
    g_dev, guard = be.asarray(bad, np.float32), be.asarray(_guard(), np.float64)
    be.unscale_gradients(loss_ok, g_dev, be.asarray(scaler, np.float64), guard)
    head = be.to_numpy(guard)[:G.RING]
    assert (head[G.FAULT], head[G.FAULT_INDEX], head[G.FAULT_STEP]) == (G.OVERFLOW, L.LOOP_THREADS + 2, 5)
    with np.errstate(invalid="ignore"):
        expected = bad * np.float32(1 / scaler[S.SCALE])
    np.testing.assert_array_equal(be.to_numpy(g_dev), expected)
    assert _flags_clean(be)
    # a non-finite loss: a real fault, the gradients untouched
    g_dev, guard = be.asarray(grads, np.float32), be.asarray(_guard(), np.float64)
    be.unscale_gradients(be.asarray(np.array([np.inf]), np.float32), g_dev, be.asarray(scaler, np.float64), guard)
    head = be.to_numpy(guard)[:G.RING]
    assert (head[G.FAULT], head[G.FAULT_INDEX]) == (G.LOSS, -1)
    np.testing.assert_array_equal(be.to_numpy(g_dev), grads)
    # a fault already set: skipped, untouched
    be.unscale_gradients(loss_ok, g_dev, be.asarray(scaler, np.float64), guard)
    head = be.to_numpy(guard)[:G.RING]
    assert (head[G.FAULT], head[G.SKIPPED]) == (G.LOSS, 1)
    np.testing.assert_array_equal(be.to_numpy(g_dev), grads)
    assert _flags_clean(be)


@needs_numba
def test_update_scale_follows_the_loss_scale_rule(be):
    """update_scale against loss_scale.update on a host copy, over a sequence of good and overflowed steps with a
    growth interval of 2: back-off, growth, the clamp at MAX_SCALE, the OVERFLOW fault cleared with the step
    counted as taken (guard[STEP] + 1), and nothing done for a real fault."""
    host_scaler = S.fresh(scale=2.0 ** 99, growth_interval=2)
    scaler = be.asarray(host_scaler, np.float64)
    seen = []
    for overflow in (False, False, False, False, True, False, True, True, False, False):
        guard = _guard()
        if overflow:
            guard[[G.FAULT, G.FAULT_STEP, G.FAULT_INDEX]] = G.OVERFLOW, 5, 3
        guard_dev = be.asarray(guard, np.float64)
        be.update_scale(scaler, guard_dev)
        S.update(host_scaler, overflow)
        np.testing.assert_array_equal(be.to_numpy(scaler), host_scaler)
        head = be.to_numpy(guard_dev)[:G.RING]
        assert (head[G.FAULT], head[G.FAULT_STEP], head[G.FAULT_INDEX], head[G.STEP]) == (G.NONE, 0, -1, 5 + overflow)
        seen.append(host_scaler[S.SCALE])
    assert host_scaler[S.OVERFLOWS] == 3 and seen[3] == seen[1] == S.MAX_SCALE   # the clamp was reached
    # a real fault: the scaler and the guard are left alone
    guard = _guard()
    guard[[G.FAULT, G.FAULT_INDEX]] = G.GRADIENT, 4
    guard_dev = be.asarray(guard, np.float64)
    be.update_scale(scaler, guard_dev)
    np.testing.assert_array_equal(be.to_numpy(scaler), host_scaler)
    np.testing.assert_array_equal(be.to_numpy(guard_dev), guard)


# ---- what the backend refuses ----------------------------------------------------------------------------------------
@needs_numba
def test_operands_of_another_precision_are_refused(be):
    x16, xb = be.zeros((2, 3), np.float16), be.zeros((2, 3), np.uint16)
    W, Z, A = be.zeros((4, 3), np.float32), be.zeros((2, 4), np.float32), be.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="storage"):
        be.dense_forward(xb, W, None, 0, 0.0, Z, A, precision="fp16")
    with pytest.raises(ValueError, match="storage"):
        be.dense_forward(x16, W, None, 0, 0.0, Z, A, precision="bf16")
    with pytest.raises(ValueError, match="storage"):
        be.dense_forward(x16, W, None, 0, 0.0, Z, A, precision="fp32")
    with pytest.raises(ValueError, match="float32"):
        be.dense_forward(be.zeros((2, 3), np.float64), be.zeros((4, 3), np.float64), None, 0, 0.0,
                         be.zeros((2, 4), np.float64), be.zeros((2, 4), np.float64), precision="tf32")


# ---- against the numpy backend, a whole network ---------------------------------------------------------------------
def _twin_nets(precision, seed=3):
    layers = lambda: [gpubp.Dense(4, 9, "tanh"), gpubp.Dense(9, 7, "leaky_relu"), gpubp.Dense(7, 3)]   # noqa: E731
    return [gpubp.Sequential(*layers(), backend=name, precision=precision, seed=seed) for name in ("numba", "numpy")]


@needs_numba
@pytest.mark.parametrize("precision", REDUCED)
def test_a_network_trains_as_the_numpy_backend_does(precision, rng):
    """Two models with the same parameters, numba and numpy, in the same precision: their gradients (every GEMM
    op, the loss, the stored 16-bit A and δ, fp16's loss scale) and three SGD steps with momentum agree to one
    unit of the precision's last place of the gradients' largest magnitude (measured here: 2·10⁻⁴ of it, most
    values bit for bit). Where a float32 value lies on a 16-bit rounding boundary the two backends' last float32
    bit may differ, and the stored value by one unit: a gradient then moves by about that unit's share."""
    numba_net, numpy_net = _twin_nets(precision)
    numba_net.set_params(numpy_net.get_params())
    X, y = rng.standard_normal((16, 4)).astype(np.float32), rng.integers(0, 3, 16)
    t = P.SIGNIFICAND_BITS[precision]
    for got, want in zip(numba_net.gradients(X, y, "softmax_ce"), numpy_net.gradients(X, y, "softmax_ce")):
        for name in want:
            scale = np.abs(want[name]).max()
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=2.0 ** -t * scale, err_msg=name)
    optimizers = [gpubp.SGD(net, lr=0.1, momentum=0.9) for net in (numba_net, numpy_net)]
    before = dict(numba_net.backend.counters)
    lazies = [numba_net.train_step(X, y, "softmax_ce", optimizers[0], sync=False) for _ in range(3)]
    moved = {k: numba_net.backend.counters[k] - before[k] for k in before}
    assert moved["sync"] == moved["d2h"] == 0, moved     # fp16's unscale and scale update included: no host wait
    losses_seen = [[float(lazy) for lazy in lazies],
                   [numpy_net.train_step(X, y, "softmax_ce", optimizers[1]) for _ in range(3)]]
    np.testing.assert_allclose(losses_seen[0], losses_seen[1], rtol=2.0 ** -t)
    assert numba_net.steps == numpy_net.steps == 3
    for got, want in zip(numba_net.get_params(), numpy_net.get_params()):
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=0.1 * 2.0 ** -t, err_msg=name)
    if precision == "fp16":
        assert numba_net.loss_scale == numpy_net.loss_scale
