"""The fully fused MLP (kernels/fused_mlp.cu, issue 13) on the CPU emulation, against gpubp/fused.py; which
models qualify; planted bugs that must fail; the compile checks (NVRTC sm_90 / sm_80 without spills, with the
registers and shared memory of every width printed).

How the kernels are compared (why layer by layer): every hidden A and δ is rounded to 16 bits when stored, so
a last-bit difference in one float32 value (the kernel's expf / tanhf against numpy's, or the order of the
accumulation) may move a stored value by one 16-bit ulp, and that difference travels on through the later
layers. So each stored layer is checked against gpubp.fused's layer function applied to the KERNEL's own
stored input of that layer (its previous A, or δ): |kernel − reference| <= the GEMM's float32 accumulation
bound (tests/test_tc_gemm.py's, times max |g'| <= 1) + one 16-bit ulp of the value (the rounding may fall on
either side) + 2^-24 absolute (fp16's subnormal spacing). A fragment, mask or pipeline error moves whole
products and fails by orders of magnitude. The whole network is also compared end to end with
gpubp.fused.forward / backward, with a coarse bound (it catches a layer skipped or repeated, which the
layer-by-layer check, fed the kernel's own inputs, would not).
"""
import ctypes
import math
import re
import sys

import numpy as np
import pytest

from gpubp import activations as acts
from gpubp import fused
from gpubp import precision as prec
from gpubp.backends import cuda_sources

from cuda_emulation import emulator as emulator_module
from test_tc_gemm import lib, planted  # noqa: F401  (fixtures: the emulator with tensor_core_cpu.h's planted bugs)

ml_dtypes = pytest.importorskip("ml_dtypes")

BM = 128
THREADS = 256
SIGNIFICAND = {"bf16": 8, "fp16": 11}
NAN16 = 0x7FFF   # a NaN in both 16-bit formats: the poison of every 16-bit output
ACT_CYCLE = [acts.RELU, acts.TANH, acts.SIGMOID, acts.LEAKY_RELU, acts.IDENTITY]


def decode(bits, precision):
    """uint16 raw bits -> float32 values."""
    if precision == "bf16":
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return bits.view(np.float16).astype(np.float32)


class Model:
    """A random qualifying model of hidden layers `hidden_widths` (w_1 .. w_L, any of them <= 128): weights
    scaled so activations stay O(1) through the layers. H is the kernel instance it runs on, the hidden layers
    zero-padded to it (gpubp.fused.padded_shapes)."""

    def __init__(self, rng, in_width, hidden_widths, out_width, act_ids, bias_pattern, alpha=0.1):
        widths = [in_width] + list(hidden_widths) + [out_width]
        self.Ws = [(rng.standard_normal((widths[l + 1], widths[l])) * 1.5 / math.sqrt(widths[l])).astype(np.float32)
                   for l in range(len(widths) - 1)]
        self.bs = [(0.3 * rng.standard_normal(widths[l + 1])).astype(np.float32) if bias_pattern[l % len(bias_pattern)]
                   else None for l in range(len(widths) - 1)]
        self.act_ids, self.alphas = list(act_ids), [alpha] * len(self.Ws)
        self.widths, self.in_width, self.out_width = list(hidden_widths), in_width, out_width
        self.H = fused.kernel_width(hidden_widths)

    @property
    def L(self):
        return len(self.Ws) - 1


WEIGHTS_OFFSET = 0         # elements past a 16-byte boundary (test_unaligned_weights sets 1)
PADDED_COLUMNS_FILL = 0.0  # the weights' padded columns (test_sigmoid_padding_is_cancelled sets 1: not zeroed)


def zero_padded(x, shape):
    """x (rows, cols) or (rows,) in the top-left corner of a zero array of `shape`."""
    out = np.zeros(shape, x.dtype)
    out[tuple(slice(0, n) for n in x.shape)] = x
    return out


def flat_weights(model, precision):
    """All weights back to back as 16-bit bits, each zero-padded to its place (gpubp.fused.padded_shapes), 16-byte
    aligned: what the caller's conversion (fused_mlp_round_kernel) writes."""
    shapes = fused.padded_shapes([W.shape for W in model.Ws])
    padded = [zero_padded(W, shape) for W, shape in zip(model.Ws, shapes)]
    for W, P in zip(model.Ws, padded):
        P[:, W.shape[1]:] = PADDED_COLUMNS_FILL
    flat = np.concatenate([prec.to_storage(P, precision).ravel() for P in padded])
    raw = np.empty(flat.size + 16, np.uint16)
    skip = (-raw.ctypes.data % 16) // 2 + WEIGHTS_OFFSET
    out = raw[skip:skip + flat.size]
    out[:] = flat
    return out


def kernel_args_common(model, precision):
    shapes = fused.padded_shapes([W.shape for W in model.Ws])
    biases = [zero_padded(b, (rows,)) for b, (rows, _) in zip(model.bs, shapes) if b is not None]
    # one NaN past the last bias: a read past them would show
    flat_b = np.concatenate(biases + [np.array([np.nan], np.float32)]).astype(np.float32)
    return flat_weights(model, precision), flat_b, np.array(model.alphas, np.float32)


def stored_input(X, precision, memory):
    """X as the kernel takes it: (array, ldx), rows contiguous, padded to a multiple of 8 plus 8 (NaN pad), or
    one element off 16-byte alignment (the element-by-element path)."""
    N, in_width = X.shape
    values = prec.to_storage(X, precision)
    ld = in_width if memory != "padded" else (in_width + 7) // 8 * 8 + 8
    offset = 1 if memory == "misaligned" else 0
    raw = np.full(max(N, 1) * ld + offset + 16, NAN16, np.uint16)
    skip = (-raw.ctypes.data % 16) // 2
    arr = raw[skip + offset:skip + offset + max(N, 1) * ld].reshape(max(N, 1), ld)
    arr[:N, :in_width] = values
    return arr, ld


def launch(lib, name, grid, args):
    """Launches a kernel of fused_mlp.cu on the emulation (lib: the emulator's library), or through `lib` itself
    where it is a GPU launcher (gpu_launcher): the numpy arrays among args are updated in place either way."""
    if hasattr(lib, "emu_signature"):
        emulator_module.EmulatedKernel(lib, name)(grid, (THREADS,), args)
    else:
        lib(name, grid, args)


def gpu_launcher():
    """A launcher (see launch) running fused_mlp.cu through CuPy on the GPU: arrays go to the device and back."""
    import cupy as cp
    source, options, names = cuda_sources.module_source("fused_mlp.cu")
    module = cp.RawModule(code=source, options=options, name_expressions=names)

    def run(name, grid, args):
        device = [cp.asarray(a) if isinstance(a, np.ndarray) else a for a in args]
        module.get_function(name)(grid, (THREADS,), tuple(device))
        for a, d in zip(args, device):
            if isinstance(a, np.ndarray):
                np.copyto(a, cp.asnumpy(d).reshape(a.shape))
    return run


def stored_input32(X, memory):
    """X as float32 rows for the kernel's x_float path: contiguous, padded (ld a multiple of 4 plus 4, NaN pad),
    or one element off 16-byte alignment."""
    N, in_width = X.shape
    ld = in_width if memory != "padded" else (in_width + 3) // 4 * 4 + 4
    offset = 1 if memory == "misaligned" else 0
    raw = np.full(max(N, 1) * ld + offset + 8, np.nan, np.float32)
    skip = (-raw.ctypes.data % 16) // 4
    arr = raw[skip + offset:skip + offset + max(N, 1) * ld].reshape(max(N, 1), ld)
    arr[:N, :in_width] = X
    return arr, ld


def run_forward(lib, precision, model, X, training, memory="contiguous", loss=None, y=None, scale=1.0,
                x_float=False):
    """(hidden [A_1..A_L] float32 or None, out (N, O) float32) from the emulated forward kernel, and with a fused
    loss (training) also (δ_L (N, O) float32, row_loss (N,) float64); every output is poisoned (NaN) first and
    must be written exactly where it belongs."""
    N = X.shape[0]
    if loss is None:
        targets, delta_L, row_loss = np.zeros(1, np.float32), np.full(1, NAN16, np.uint16), np.full(1, np.nan)
    else:
        targets = np.ascontiguousarray(y, np.float32).ravel()
        delta_L = np.full(N * model.out_width + 1, NAN16, np.uint16)
        row_loss = np.full(N + 1, np.nan)
    if x_float:   # the float32 input path: X (16-bit) is a dummy the kernel must not read
        x32, ldx = stored_input32(X, memory)
        x = np.full(1, NAN16, np.uint16)
    else:
        x, ldx = stored_input(X, precision, memory)
        x32 = np.full(1, np.nan, np.float32)
    weights, biases, alphas = kernel_args_common(model, precision)
    out = np.full((N + 1, model.out_width), np.nan, np.float32)            # one extra row: must stay NaN
    hidden = np.full((model.L * N + 1) * model.H if training else 1, NAN16, np.uint16)
    name = cuda_sources.fused_kernel_name("fused_mlp_forward_kernel", precision, model.H)
    launch(lib, name, (max(1, math.ceil(N / BM)),),
        [x.ravel() if memory != "misaligned" else x.reshape(-1), np.int32(ldx), np.int32(model.in_width),
         weights, biases, alphas, fused.pack_activations(model.act_ids), fused.pack_bias_mask(model.bs),
         np.int32(len(model.Ws)), np.int32(model.out_width), np.int32(N), np.int32(training), out.ravel(),
         hidden, np.int32(-1 if loss is None else loss), targets, delta_L, row_loss, np.array([scale]),
         x32.reshape(-1), np.int32(x_float)])
    assert np.isnan(out[N]).all(), "the forward kernel wrote past row N of out"
    assert delta_L[-1] == NAN16 and np.isnan(row_loss[-1]), "the forward kernel wrote past δ_L or row_loss"
    if not training:
        assert hidden[0] == NAN16, "inference wrote hidden activations"
        return None, out[:N]
    assert hidden[-model.H:].tolist() == [NAN16] * model.H, "the forward kernel wrote past the hidden activations"
    hidden = [decode(h, precision) for h in hidden[:-model.H].reshape(model.L, N, model.H)]
    for l, (h, w) in enumerate(zip(hidden, model.widths)):   # a padded unit: Z = 0, A = g(0) (0.5 for sigmoid)
        assert (h[:, w:] == padding_activation(model, l, precision)).all(), f"hidden layer {l}'s padding"
    hidden = [h[:, :w] for h, w in zip(hidden, model.widths)]
    if loss is None:
        return hidden, out[:N]
    return hidden, out[:N], decode(delta_L[:-1], precision).reshape(N, model.out_width), row_loss[:-1]


def padding_activation(model, l, precision):
    """What the forward stores in hidden layer l's padded columns: round_P(g_l(0))."""
    g0 = acts.forward(model.act_ids[l], np.zeros(1, np.float32), np.float32(model.alphas[l]))
    return prec.round_operand(g0, precision)[0]


def run_backward(lib, precision, model, delta_out, hidden):
    """[δ_0 .. δ_{L-1}] float32 (real columns) from the emulated backward kernel, given δ_L and the hidden A (real
    columns; stored padded as the forward stores them). The padded columns of every δ must come out exactly 0."""
    N = delta_out.shape[0]
    weights, _, alphas = kernel_args_common(model, precision)
    padded = [np.hstack([h, np.full((N, model.H - h.shape[1]), padding_activation(model, l, precision), np.float32)])
              for l, h in enumerate(hidden)]
    stored_hidden = np.concatenate([prec.to_storage(h, precision).ravel() for h in padded] +
                                   [np.zeros(1, np.uint16)]) if N else np.zeros(1, np.uint16)
    deltas = np.full((model.L * N + 1) * model.H, NAN16, np.uint16)
    name = cuda_sources.fused_kernel_name("fused_mlp_backward_kernel", precision, model.H)
    launch(lib, name, (max(1, math.ceil(N / BM)),),
        [np.concatenate([prec.to_storage(delta_out, precision).ravel(), np.zeros(1, np.uint16)]),
         np.int32(model.out_width), weights, np.int32(model.in_width), alphas,
         fused.pack_activations(model.act_ids), np.int32(len(model.Ws)), np.int32(N), stored_hidden, deltas])
    assert deltas[-model.H:].tolist() == [NAN16] * model.H, "the backward kernel wrote past the deltas"
    deltas = [decode(d, precision) for d in deltas[:-model.H].reshape(model.L, N, model.H)]
    for l, (d, w) in enumerate(zip(deltas, model.widths)):   # dA of a padded unit is δ · (a zero column)
        assert (d[:, w:] == 0).all(), f"δ of hidden layer {l}: nonzero in the padding"
    return [d[:, :w] for d, w in zip(deltas, model.widths)]


# ---- tolerances ---------------------------------------------------------------------------------------------------
def gemm_bound(A, B, precision):
    """test_tc_gemm's elementwise bound of a float32-accumulated product of P operands: A (M, K) · B (N, K)ᵀ."""
    K = A.shape[1]
    scale = np.abs(prec.round_operand(A, precision)).astype(np.float64) @ \
        np.abs(prec.round_operand(B, precision)).astype(np.float64).T
    return (math.ceil(K / 16) + 1) * 8 * 2.0**-24 * scale


def stored_error(kernel, reference, product_bound, precision):
    """max |kernel − reference| / (product bound + one P ulp + 2^-24): <= 1 passes (module docstring); NaN
    (a value never written, or poison read) gives inf."""
    ulp = 2.0**(1 - SIGNIFICAND[precision]) * np.maximum(np.abs(kernel), np.abs(reference))
    excess = np.abs(kernel.astype(np.float64) - reference) / (product_bound + ulp + 2.0**-24)
    return float(np.max(np.where(np.isnan(excess), np.inf, excess))) if excess.size else 0.0


def forward_error(model, precision, X, hidden, out):
    """The worst layer-by-layer error of a training forward (stored A of each hidden layer, then Z_L)."""
    inputs = [prec.round_operand(X, precision)] + hidden
    errors = []
    for l in range(model.L):
        ref = fused.hidden_layer(inputs[l], model.Ws[l], model.bs[l], model.act_ids[l], model.alphas[l], precision)
        errors.append(stored_error(hidden[l], ref, gemm_bound(inputs[l], model.Ws[l], precision), precision))
    ref = fused.output_layer(inputs[-1], model.Ws[-1], model.bs[-1], model.act_ids[-1], model.alphas[-1], precision,
                             training=True)
    bound = gemm_bound(inputs[-1], model.Ws[-1], precision) + 2.0**-23 * np.abs(ref) + 2.0**-30
    excess = np.abs(out.astype(np.float64) - ref) / bound
    errors.append(float(np.max(np.where(np.isnan(excess), np.inf, excess))) if excess.size else 0.0)
    return max(errors)


def backward_error(model, precision, delta_out, hidden, deltas):
    errors = []
    following = [deltas[l + 1] for l in range(model.L - 1)] + [prec.round_operand(delta_out, precision)]
    for l in range(model.L):
        ref = fused.hidden_delta(following[l], model.Ws[l + 1], hidden[l], model.act_ids[l], model.alphas[l],
                                 precision)
        bound = gemm_bound(following[l], np.ascontiguousarray(model.Ws[l + 1].T), precision)
        errors.append(stored_error(deltas[l], ref, bound, precision))
    return max(errors)


def coarse_error(kernel, reference, precision):
    """End to end: max |kernel − reference| / (2^(4−p) (1 + |reference|)), p = P's significand bits: a few
    16-bit ulps carried through a few layers pass; a layer skipped, repeated or mis-wired does not."""
    excess = np.abs(kernel.astype(np.float64) - reference) / (2.0**(4 - SIGNIFICAND[precision]) *
                                                              (1 + np.abs(reference)))
    return float(np.max(np.where(np.isnan(excess), np.inf, excess))) if excess.size else 0.0


# ---- the kernels against the reference ------------------------------------------------------------------------
# (precision, hidden widths, N, in, out, activations (hidden..., output), bias pattern, X memory):
# every width with the edge batches around a block (1, 127, 129), input widths below a chunk, between
# chunks, past a slice (1, 7, 33, 70), outputs 1..128, every activation, bias on and off, both precisions,
# the three input memory layouts; the big batches at one width. Then hidden widths the kernels run zero-padded
# (gpubp/fused.py): mixed widths on H = 64, a width of no instance (50 -> 64, 100 -> 128), sigmoid in padded
# layers (its padded units hold 0.5, which the next layer's zero columns must cancel), with and without bias.
CASES = [
    ("bf16", [16] * 2, 129, 7, 3, [acts.RELU, acts.TANH, acts.IDENTITY], [True], "contiguous"),
    ("fp16", [16] * 1, 1, 1, 1, [acts.SIGMOID, acts.SIGMOID], [False], "contiguous"),
    ("fp16", [48] * 2, 127, 33, 17, [acts.LEAKY_RELU, acts.SIGMOID, acts.TANH], [True, False], "padded"),
    ("bf16", [48] * 1, 129, 70, 10, [acts.TANH, acts.LEAKY_RELU], [False, True], "misaligned"),
    ("bf16", [64] * 3, 127, 64, 128, [acts.SIGMOID, acts.RELU, acts.LEAKY_RELU, acts.SIGMOID], [True], "contiguous"),
    ("fp16", [64] * 2, 1, 40, 9, [acts.IDENTITY, acts.TANH, acts.RELU], [False, True], "misaligned"),
    ("bf16", [128] * 2, 129, 33, 5, [acts.RELU, acts.IDENTITY, acts.TANH], [True, False], "padded"),
    ("fp16", [128] * 1, 127, 16, 128, [acts.TANH, acts.LEAKY_RELU], [True], "contiguous"),
    ("bf16", [32] * 2, 1000, 24, 10, [acts.RELU, acts.RELU, acts.IDENTITY], [True], "contiguous"),
    ("fp16", [16] * 2, 4099, 5, 2, [acts.TANH, acts.RELU, acts.SIGMOID], [True, False], "contiguous"),
    ("bf16", [48, 16, 64], 129, 7, 3, [acts.SIGMOID, acts.RELU, acts.SIGMOID, acts.IDENTITY], [True], "contiguous"),
    ("fp16", [48, 16, 64], 1, 7, 3, [acts.SIGMOID, acts.SIGMOID, acts.TANH, acts.IDENTITY], [False], "misaligned"),
    ("fp16", [50], 129, 33, 5, [acts.SIGMOID, acts.SIGMOID], [True, False], "contiguous"),
    ("bf16", [100, 36], 1, 20, 10, [acts.TANH, acts.SIGMOID, acts.IDENTITY], [False, True], "padded"),
]


def case_id(case):
    precision, widths, N, in_width, out_width, act_ids, bias, memory = case
    names = {v: k for k, v in acts.NAMES.items()}
    return (f"{precision}-w{'.'.join(map(str, widths))}-N{N}-in{in_width}-out{out_width}-{'.'.join(names[a] for a in act_ids)}-"
            f"bias{''.join('1' if b else '0' for b in bias)}-{memory}")


def make_case(case, rng):
    precision, widths, N, in_width, out_width, act_ids, bias, memory = case
    model = Model(rng, in_width, widths, out_width, act_ids, bias)
    X = rng.standard_normal((N, in_width)).astype(np.float32)
    return precision, model, X, memory


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_and_backward_match_the_reference(lib, case, rng):
    precision, model, X, memory = make_case(case, rng)
    ok, why = fused.qualifies([type("D", (), {"n_in": W.shape[1], "n_out": W.shape[0]})() for W in model.Ws], precision)
    assert ok, why
    hidden, Z = run_forward(lib, precision, model, X, training=True, memory=memory)
    assert forward_error(model, precision, X, hidden, Z) <= 1
    ref_hidden, ref_Z = fused.forward(X, model.Ws, model.bs, model.act_ids, model.alphas, precision, training=True)
    assert coarse_error(Z, ref_Z, precision) <= 1
    for h, r in zip(hidden, ref_hidden):
        assert coarse_error(h, r, precision) <= 1

    # inference: the same accumulators, so g_L of the training run's Z_L (the device's expf/tanhf against
    # numpy's: a few float32 ulps), and no hidden activation written
    _, out = run_forward(lib, precision, model, X, training=False, memory=memory)
    expected = acts.forward(model.act_ids[-1], Z.copy(), np.float32(model.alphas[-1]))
    np.testing.assert_allclose(out, expected, rtol=2.0**-20, atol=2.0**-24)

    # backward from a random δ_L, on the reference's hidden activations (independent of the forward's)
    delta_out = (rng.standard_normal(Z.shape) / max(1, X.shape[0])).astype(np.float32)
    deltas = run_backward(lib, precision, model, delta_out, ref_hidden)
    assert backward_error(model, precision, delta_out, ref_hidden, deltas) <= 1
    ref_deltas = fused.backward(delta_out, model.Ws, ref_hidden, model.act_ids, model.alphas, precision)
    scale = max(float(np.abs(d).max()) for d in ref_deltas) or 1.0
    for d, r in zip(deltas, ref_deltas):
        assert coarse_error(d / scale, r / scale, precision) <= 1
    # the weight gradients the per-layer GEMM will make from them (reference_gemm), against the reference's
    grads = fused.weight_gradients(X, ref_hidden, deltas, delta_out, precision)
    ref_grads = fused.weight_gradients(X, ref_hidden, ref_deltas, delta_out, precision)
    for g, r in zip(grads, ref_grads):
        norm = np.linalg.norm(r["W"]) or 1.0
        assert np.linalg.norm(g["W"] - r["W"]) <= 2.0**(4 - SIGNIFICAND[precision]) * norm


def test_same_bits_under_other_schedules(lib, rng):
    """Each value is one lane's fixed chain of mma: the emulation's thread and block order must not change a bit."""
    precision, model, X, _ = make_case(("bf16", [32] * 2, 200, 20, 6, [acts.TANH, acts.RELU, acts.IDENTITY], [True],
                                        "contiguous"), rng)
    runs = []
    try:
        for seed in (1, 2):
            emulator_module.set_seed(lib, seed)
            runs.append(run_forward(lib, precision, model, X, training=True))
    finally:
        emulator_module.set_seed(lib, int(__import__("os").environ.get("GPUBP_EMULATION_SEED", "0")))
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    for a, b in zip(runs[0][0], runs[1][0]):
        np.testing.assert_array_equal(a, b)


@pytest.fixture
def skewed(lib):
    """The emulation's scheduler with skew (cuda_cpu.h's emu_skew_percent) for the rest of the test."""
    lib.emu_set_skew.argtypes = [ctypes.c_int]
    lib.emu_set_skew(50)
    yield
    lib.emu_set_skew(0)


def test_unaligned_weights_take_the_element_path(lib, monkeypatch, rng):
    """Weights one element off 16-byte alignment: no cp.async (it would fault), element loads instead, and the
    very same results bit for bit (the same products in the same order)."""
    precision, model, X, _ = make_case(("fp16", [48] * 2, 70, 24, 9, [acts.TANH, acts.RELU, acts.SIGMOID], [True],
                                        "contiguous"), rng)
    delta_out = rng.standard_normal((70, 9)).astype(np.float32)
    runs = []
    for offset in (0, 1):
        monkeypatch.setattr(sys.modules[__name__], "WEIGHTS_OFFSET", offset)
        hidden, Z = run_forward(lib, precision, model, X, training=True)
        runs.append([Z] + hidden + run_backward(lib, precision, model, delta_out, hidden))
    for aligned, unaligned in zip(*runs):
        np.testing.assert_array_equal(aligned, unaligned)
    assert forward_error(model, precision, X, runs[0][1:3], runs[0][0]) <= 1


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_round_kernel_is_round_operand_bit_for_bit(lib, precision, rng):
    """The conversion the caller runs on the weights: RNE to P, exactly gpubp.precision's to_storage, on ties,
    overflow, subnormals, inf and NaN, into a zero-padded place (rows and columns past the matrix's are +0, over
    whatever was there); nothing written past it."""
    ties = np.array([1 + 2.0**-8, 1 + 3 * 2.0**-8, -(1 + 2.0**-11), 1 + 3 * 2.0**-11, 65519.0, 65520.0, 1e6,
                     3.4e38, 1e-40, 3e-8, 6e-8, 0.0, -0.0, np.inf, -np.inf, np.nan], np.float32)
    x = np.concatenate([ties, rng.standard_normal(1000).astype(np.float32) * 10.0**rng.integers(-6, 6, 1000)])
    x = x.astype(np.float32).reshape(8, 127)
    rows, cols = 10, 128
    dst = np.full(rows * cols + 1, 0x1234, np.uint16)
    name = cuda_sources.tc_kernel_name("fused_mlp_round_kernel", precision)
    emulator_module.EmulatedKernel(lib, name)((3,), (THREADS,), [x.ravel(), np.int32(8), np.int32(127), dst,
                                                                 np.int32(rows), np.int32(cols)])   # grid-stride
    assert dst[-1] == 0x1234
    got = dst[:-1].reshape(rows, cols)
    assert not got[8:].any() and not got[:, 127:].any()
    with np.errstate(over="ignore"):   # fp16 overflow to inf is the documented rounding
        expected = prec.to_storage(x, precision)
    finite = ~np.isnan(x)
    np.testing.assert_array_equal(got[:8, :127][finite], expected[finite])
    assert np.isnan(decode(got[:8, :127][~finite], precision)).all()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_float32_input_is_rounded_in_the_kernel(lib, precision, rng):
    """X as float32 (x_float = 1), contiguous, padded or unaligned rows: the very same results, bit for bit, as X
    rounded by the caller (round_operand's RNE, in the staging instead of a pass of its own)."""
    _, model, X, _ = make_case((precision, [32] * 1, 129, 37, 5, [acts.TANH, acts.IDENTITY], [True], "contiguous"), rng)
    X[0, :4] = [1 + 2.0**-8, 1 + 3 * 2.0**-8, 1 + 2.0**-11, 1 + 3 * 2.0**-11]   # ties of both formats
    expected = run_forward(lib, precision, model, X, training=True)
    for memory in ("contiguous", "padded", "misaligned"):
        got = run_forward(lib, precision, model, X, training=True, memory=memory, x_float=True)
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_array_equal(got[0][0], expected[0][0])


# ---- the loss fused into the training forward -------------------------------------------------------------------
LOSS_CASES = [   # (precision, hidden widths, N, in, out, activations, bias, loss)
    ("bf16", [32] * 2, 129, 9, 3, [acts.RELU, acts.TANH, acts.TANH], [True], "mse"),
    ("fp16", [16] * 1, 127, 20, 5, [acts.LEAKY_RELU, acts.SIGMOID], [False, True], "mse"),
    ("fp16", [48] * 1, 129, 33, 4, [acts.TANH, acts.SIGMOID], [True], "bce"),
    ("bf16", [64] * 2, 130, 17, 10, [acts.RELU, acts.SIGMOID, acts.IDENTITY], [True, False], "softmax_ce"),
    ("fp16", [16] * 1, 1, 3, 128, [acts.TANH, acts.IDENTITY], [True], "softmax_ce"),
    ("bf16", [20, 40], 129, 9, 4, [acts.SIGMOID, acts.TANH, acts.SIGMOID], [True], "bce"),   # padded to H = 48
]


def targets(rng, loss, N, out_width):
    if loss == "softmax_ce":
        return np.eye(out_width, dtype=np.float32)[rng.integers(0, out_width, N)]
    if loss == "bce":
        return rng.integers(0, 2, (N, out_width)).astype(np.float32)
    return rng.standard_normal((N, out_width)).astype(np.float32)


@pytest.mark.parametrize("case", LOSS_CASES,
                         ids=lambda c: f"{c[0]}-w{'.'.join(map(str, c[1]))}-N{c[2]}-out{c[4]}-{c[7]}")
def test_fused_loss_matches_the_reference(lib, case, rng):
    """A, δ_L and the loss from the kernel's own last hidden layer (layer by layer, as above), then the whole
    training step's weight gradients (forward with the loss, backward, dW by reference_gemm) end to end."""
    precision, widths, N, in_width, out_width, act_ids, bias, loss_name = case
    loss = {"mse": 0, "bce": 1, "softmax_ce": 2}[loss_name]
    model = Model(rng, in_width, widths, out_width, act_ids, bias)
    X = rng.standard_normal((N, in_width)).astype(np.float32)
    y = targets(rng, loss_name, N, out_width)
    scale = 2.0**13 if precision == "fp16" else 1.0   # the fp16 loss scale (gpubp/loss_scale.py)
    hidden, A, delta_L, row_loss = run_forward(lib, precision, model, X, training=True, loss=loss, y=y,
                                               scale=scale)
    # Z_L from the kernel's last stored layer, then the loss on it: differences come from Z_L's float32
    # accumulation (bound b per element; softmax mixes a row: 2 · the row's largest b) and the device's
    # expf/logf (a few float32 ulps), and for δ_L one 16-bit ulp of rounding
    Z = fused.output_layer(hidden[-1], model.Ws[-1], model.bs[-1], act_ids[-1], model.alphas[-1], precision,
                           training=True)
    ref_A, ref_delta, ref_value = fused.output_loss(Z, y, loss, act_ids[-1], model.alphas[-1], precision, scale)
    b = 2 * gemm_bound(hidden[-1], model.Ws[-1], precision).max(axis=1, keepdims=True) + 2.0**-20
    assert (np.abs(A - ref_A) <= b * (1 + np.abs(ref_A))).all()
    per = {0: N, 1: N * out_width, 2: N}[loss]
    ulp = 2.0**(1 - SIGNIFICAND[precision]) * np.maximum(np.abs(delta_L), np.abs(ref_delta))
    assert (np.abs(delta_L - ref_delta) <= ulp + scale * b * (2 + np.abs(y) + np.abs(ref_A)) / per + 2.0**-24).all()
    assert abs(row_loss.sum() - ref_value) <= 1e-5 * (1 + abs(ref_value)) + float(b.max()) * (1 + np.abs(y).max())

    # the whole step: dW from the kernels' δ (backward from the kernel's δ_L and hidden A) against the reference's
    deltas = run_backward_bits(lib, precision, model, delta_L, hidden)
    ref_hidden, ref_Z = fused.forward(X, model.Ws, model.bs, act_ids, model.alphas, precision, training=True)
    _, ref_delta_L, _ = fused.output_loss(ref_Z, y, loss, act_ids[-1], model.alphas[-1], precision, scale)
    ref_deltas = fused.backward(ref_delta_L, model.Ws, ref_hidden, act_ids, model.alphas, precision)
    grads = fused.weight_gradients(X, hidden, deltas, delta_L, precision)
    ref_grads = fused.weight_gradients(X, ref_hidden, ref_deltas, ref_delta_L, precision)
    for g, r in zip(grads, ref_grads):
        for key in ("W", "b"):
            assert np.linalg.norm(g[key] - r[key]) <= 2.0**(5 - SIGNIFICAND[precision]) * (np.linalg.norm(r[key]) + 1e-6)


def run_backward_bits(lib, precision, model, delta_L, hidden):
    """run_backward for a δ_L that already holds P values (the forward's): rounding it again changes nothing."""
    assert np.array_equal(prec.round_operand(delta_L, precision), delta_L)
    return run_backward(lib, precision, model, delta_L, hidden)


SKEW_CASES = {   # the input slices' stage refills (H = 64: long slices); the weight buffer's refills (3 hidden layers)
    "input-stages": ("bf16", [64] * 2, 129, 100, 32, [acts.TANH, acts.RELU, acts.SIGMOID], [True], "contiguous"),
    "weight-buffer": ("bf16", [32] * 3, 129, 20, 32, [acts.TANH, acts.RELU, acts.SIGMOID, acts.TANH], [True],
                      "contiguous"),
}


@pytest.mark.parametrize("which", list(SKEW_CASES))
def test_warps_drifting_apart_change_nothing(lib, skewed, which):
    """Warps that drift apart by many barrier stretches (a GPU gives no lockstep between warps) must still agree
    with the reference: every refill of a shared buffer (the input slices' stages, the weight buffer) waits
    at a __syncthreads for every warp to be done with what was there. Without the skew, the emulation runs
    warps of equal work in lockstep and a missing barrier there goes unseen. Fixed data and schedules: each
    case fails, on at least one of its schedules, with the barrier it guards removed (see the issue 13 report)."""
    precision, model, X, _ = make_case(SKEW_CASES[which], np.random.default_rng(0))
    delta_out = np.random.default_rng(1).standard_normal((X.shape[0], model.out_width)).astype(np.float32)
    try:
        for seed in (1, 2, 3):
            emulator_module.set_seed(lib, seed)
            hidden, Z = run_forward(lib, precision, model, X, training=True)
            assert forward_error(model, precision, X, hidden, Z) <= 1, f"schedule {seed}"
            deltas = run_backward(lib, precision, model, delta_out, hidden)
            assert backward_error(model, precision, delta_out, hidden, deltas) <= 1, f"schedule {seed}"
    finally:
        emulator_module.set_seed(lib, int(__import__("os").environ.get("GPUBP_EMULATION_SEED", "0")))


# ---- planted bugs: each must make the comparison fail ----------------------------------------------------------------
PLANTED = {   # tests/cuda_emulation/tensor_core_cpu.h's EmuPlantedBug
    1: "mma m16n8k16 A column + 1 (the register chaining of C into A fragments, and the input's ldmatrix)",
    2: "mma m16n8k16 B k-row + 1",
    3: "mma C/D column + 1 (the epilogue's columns: bias, stores, chaining)",
    5: "ldmatrix row + 1 (X slices, weights in forward)",
    6: "ldmatrix.trans column + 1 (weights in backward)",
    7: "cp.async.wait_group retires one group too few (the input pipeline and the weight copies)",
}


@pytest.mark.parametrize("bug", list(PLANTED), ids=lambda b: f"bug{b}")
def test_planted_bug_fails_the_comparison(lib, planted, bug, rng):
    precision, model, X, _ = make_case(("bf16", [32] * 2, 40, 40, 8, [acts.TANH, acts.SIGMOID, acts.IDENTITY], [True],
                                        "contiguous"), rng)
    delta_out = rng.standard_normal((40, 8)).astype(np.float32)
    ref_hidden, _ = fused.forward(X, model.Ws, model.bs, model.act_ids, model.alphas, precision, training=True)
    planted(bug)
    if bug == 6:   # ldmatrix.trans is backward's only
        deltas = run_backward(lib, precision, model, delta_out, ref_hidden)
        error = backward_error(model, precision, delta_out, ref_hidden, deltas)
    else:
        hidden, Z = run_forward(lib, precision, model, X, training=True)
        error = forward_error(model, precision, X, hidden, Z)
    assert error > 100, f"planted bug {bug} ({PLANTED[bug]}) went unnoticed: error {error} x tolerance"


# ---- on a GPU (marked gpu: skipped, with the probe's reason, where none is present) ------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fused_on_gpu(precision, rng):
    """The same comparisons on the hardware, at realistic batches: every width, the forward with and without the
    loss, the backward. The hardware's mma may round inside a step (test_tc_gemm.py's docstring): the bound
    used here is twice the emulation's."""
    run = gpu_launcher()
    for H, L, N, in_width, out_width in [(16, 2, 65537, 3, 1), (32, 3, 4099, 784, 10), (48, 1, 1000, 48, 17),
                                         (64, 4, 1 << 16, 64, 64), (128, 2, 20000, 100, 128)]:
        model = Model(rng, in_width, [H] * L, out_width, ACT_CYCLE[:L] + [acts.IDENTITY], [True, False])
        X = rng.standard_normal((N, in_width)).astype(np.float32)
        hidden, Z = run_forward(run, precision, model, X, training=True, x_float=in_width == 784)
        assert forward_error(model, precision, X, hidden, Z) <= 2, (H, N)
        _, out = run_forward(run, precision, model, X, training=False)
        np.testing.assert_allclose(out, Z, rtol=2.0**-20, atol=2.0**-24)   # identity output
        y = np.eye(out_width, dtype=np.float32)[rng.integers(0, out_width, N)]
        hidden, A, delta_L, row_loss = run_forward(run, precision, model, X, training=True, loss=2, y=y)
        Z = fused.output_layer(hidden[-1], model.Ws[-1], model.bs[-1], acts.IDENTITY, model.alphas[-1], precision,
                               training=True)
        _, _, value = fused.output_loss(Z, y, 2, acts.IDENTITY, model.alphas[-1], precision)
        assert abs(row_loss.sum() - value) <= 1e-4 * (1 + abs(value)), (H, N)
        deltas = run_backward(run, precision, model, delta_L, hidden)
        assert backward_error(model, precision, delta_L, hidden, deltas) <= 2, (H, N)


ASAN_SELECTION = "match_the_reference and (misaligned or padded or N1-)"


@pytest.mark.slow
def test_tails_under_address_sanitizer():
    """The tail blocks, unaligned and padded inputs, N = 1, under AddressSanitizer: every array argument sits
    between poisoned guard zones, so a load one element past X, the weights, δ_L or the last layer's stored A
    fails its launch (a read the comparison cannot see: its value would only reach rows that are never stored)."""
    ok, output = emulator_module.rerun_under_asan(__file__, ASAN_SELECTION)
    if ok is None:
        pytest.skip(output)
    assert ok, output


# ---- which models qualify ---------------------------------------------------------------------------------------
class D:
    def __init__(self, n_in, n_out):
        self.n_in, self.n_out = n_in, n_out


@pytest.mark.parametrize("layers,precision,ok,words", [
    ([D(784, 64), D(64, 64), D(64, 10)], "bf16", True, ""),
    ([D(3, 128), D(128, 128)], "fp16", True, ""),
    ([D(5, 16), D(16, 1)], "bf16", True, ""),
    ([D(784, 64), D(64, 10)], "fp32", False, "precision"),
    ([D(784, 64), D(64, 10)], "tf32", False, "precision"),
    ([D(784, 10)], "bf16", False, "single layer"),
    ([D(8, 64), D(64, 32), D(32, 1)], "bf16", True, ""),     # mixed widths: padded to H = 64
    ([D(8, 80), D(80, 1)], "bf16", True, ""),                  # 80 -> 128
    ([D(8, 1), D(1, 1)], "fp16", True, ""),                    # 1 -> 16
    ([D(8, 128), D(128, 20), D(20, 3)], "bf16", True, ""),
    ([D(8, 129), D(129, 1)], "bf16", False, "layer 0 (Dense(8, 129)): hidden width 129"),
    ([D(8, 64), D(64, 256), D(256, 1)], "bf16", False, "layer 1 (Dense(64, 256)): hidden width 256"),
    ([D(8, 64), D(64, 129)], "bf16", False, "output width 129"),
    ([D(8, 64), D(32, 1)], "bf16", False, "does not take"),
    ([D(8, 16)] + [D(16, 16)] * 16, "bf16", False, "at most 16"),
])
def test_qualifies(layers, precision, ok, words):
    result, reason = fused.qualifies(layers, precision)
    assert result is ok and (words in reason if not ok else reason == "")


@pytest.mark.parametrize("widths,H,fraction", [([64] * 3, 64, 0.0), ([1], 16, 1 - (8 + 1) / (16 * 8 + 16)),
                                               ([50, 50], 64, 1 - (8 * 50 + 2500 + 50) / (8 * 64 + 4096 + 64)),
                                               ([48, 16, 64], 64, None), ([100], 128, None)])
def test_kernel_width_and_padded_layout(widths, H, fraction):
    """The instance is the smallest H >= the widest hidden layer; hidden layers take H rows, the layers after
    the input H columns; input and output widths are kept (8 in, 1 out here)."""
    layers = [D(a, b) for a, b in zip([8] + widths, widths + [1])]
    assert fused.kernel_width(widths) == H
    assert fused.padded_shapes([(l.n_out, l.n_in) for l in layers]) == [(H, 8)] + [(H, H)] * (len(widths) - 1) + [(1, H)]
    if fraction is not None:
        assert fused.padding_fraction(layers) == pytest.approx(fraction)
    with pytest.raises(ValueError, match="hidden width 129"):
        fused.kernel_width(widths + [129])


@pytest.mark.parametrize("columns", [0.0, 1.0], ids=["zeroed", "not-zeroed"])
def test_sigmoid_padding_is_cancelled(lib, monkeypatch, rng, columns):
    """A sigmoid layer 50 wide on H = 64: its 14 padded units hold σ(0) = 0.5, not 0 (run_forward checks it), and
    the output still is the unpadded model's because the output layer's columns 50..63 are zero. With those
    columns not zeroed (what a packing that forgot them would leave), the same comparison fails."""
    monkeypatch.setattr(sys.modules[__name__], "PADDED_COLUMNS_FILL", columns)
    precision, model, X, _ = make_case(("bf16", [50], 129, 20, 6, [acts.SIGMOID, acts.IDENTITY], [True],
                                        "contiguous"), rng)
    hidden, Z = run_forward(lib, precision, model, X, training=True)
    error = forward_error(model, precision, X, hidden, Z)
    assert error <= 1 if columns == 0 else error > 100


def test_reference_backward_is_the_gradient_of_the_reference_forward(rng):
    """The δ recursion fused.backward implements (δ_l = (δ_{l+1} · W_{l+1}) ⊙ g' from the stored A), written
    out in float64 without rounding, is the chain rule: a central difference of Σ up ⊙ Z_L with respect to
    one element of Z_0 agrees with it. And fused.backward itself (fp16) stays within a few fp16 ulps of it."""
    model = Model(rng, 5, [16] * 2, 3, [acts.TANH, acts.SIGMOID, acts.IDENTITY], [True])
    X = rng.standard_normal((4, 5))
    up = rng.standard_normal((4, 3))

    def forward64(X):
        A, hidden = X, []
        for l, (W, b) in enumerate(zip(model.Ws, model.bs)):
            Z = A @ W.astype(np.float64).T + (b if b is not None else 0)
            if l == model.L:
                return hidden, Z
            A = acts.forward(model.act_ids[l], Z, 0.1)
            hidden.append(A)

    hidden, _ = forward64(X)
    delta = up
    deltas = [None] * model.L
    for l in range(model.L - 1, -1, -1):
        dA = delta @ model.Ws[l + 1].astype(np.float64)
        delta = acts.derivative_mask(model.act_ids[l], dA, hidden[l], hidden[l], 0.1)
        deltas[l] = delta
    # d(Σ up · Z_L)/dZ_0 by central differences on Z_0 through the layers above it
    i, j, h = 2, 7, 1e-6
    Z0 = X @ model.Ws[0].astype(np.float64).T + model.bs[0]

    def loss_from_Z0(Z0):
        A = acts.forward(model.act_ids[0], Z0, 0.1)
        for l in range(1, model.L + 1):
            Z = A @ model.Ws[l].astype(np.float64).T + (model.bs[l] if model.bs[l] is not None else 0)
            A = acts.forward(model.act_ids[l], Z, 0.1) if l < model.L else Z
        return float(np.sum(up * A))

    plus, minus = Z0.copy(), Z0.copy()
    plus[i, j] += h
    minus[i, j] -= h
    assert abs((loss_from_Z0(plus) - loss_from_Z0(minus)) / (2 * h) - deltas[0][i, j]) < 1e-6
    # and the fused reference (16-bit) stays near the float64 chain rule
    ref_deltas = fused.backward(up.astype(np.float32), model.Ws, [h.astype(np.float32) for h in hidden],
                                model.act_ids, model.alphas, "fp16")
    assert np.abs(ref_deltas[0] - deltas[0]).max() <= 2.0**-6 * (1 + np.abs(deltas[0]).max())


# ---- compiling for the GPU -------------------------------------------------------------------------------------------
def ptxas_report(arch):
    """{name expression: (registers, (stack, spill stores, spill loads), shared bytes)} of fused_mlp.cu through
    NVRTC with the runtime's options, from test_kernels_compile's cached compile (one a file and arch)."""
    import test_kernels_compile as compile_tests
    if compile_tests.NVRTC is None:
        pytest.skip(str(compile_tests.NVRTC_MISSING))
    lowered, log = compile_tests.nvrtc_compile("fused_mlp.cu", arch)
    by_symbol = {symbol: name for name, symbol in lowered.items()}
    report = {}
    for block in log.split("Compiling entry function '")[1:]:
        name = by_symbol[block.split("'")[0]]
        spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block)
        smem = re.search(r"(\d+) bytes smem", block)   # absent where a kernel has none
        report[name] = (int(re.search(r"Used (\d+) registers", block).group(1)),
                        tuple(int(x) for x in spill.groups()), int(smem.group(1)) if smem else 0)
    return report


@pytest.mark.parametrize("arch", [90, 80])
def test_nvrtc_compiles_without_spills(arch, capsys):
    """Every width and precision: no local memory, the shared memory of the file header's table, and the
    register budget of __launch_bounds__ (<= 128 for 2 blocks an SM up to H = 64, <= 255 at H = 128).
    The numbers are printed (pytest -s, or the captured output of a failure)."""
    report = ptxas_report(arch)
    _, _, names = cuda_sources.module_source("fused_mlp.cu")
    assert sorted(report) == sorted(names)
    expected_smem = {16: 18432, 32: 20480, 48: 22528, 64: 24576, 128: 34816}
    with capsys.disabled():
        print(f"\nfused_mlp.cu sm_{arch}: registers / shared bytes")
    for name, (registers, spill, shared) in sorted(report.items()):
        with capsys.disabled():
            print(f"  {name:44s} {registers:4d} regs  {shared:6d} B smem  spill {spill}")
        if "round" in name:
            assert spill == (0, 0, 0) and shared == 0, (name, spill, shared)
            continue
        H = int(name.rstrip(">").split(",")[-1])
        assert spill == (0, 0, 0), (name, spill)
        assert shared == expected_smem[H], (name, shared)
        assert registers <= (128 if H <= 64 else 255), (name, registers)


@pytest.mark.skipif(__import__("shutil").which("nvcc") is None, reason="nvcc is not installed here")
def test_nvcc_compiles_to_cubin(tmp_path):
    """nvcc down to SASS (sm_80: the oldest arch the cvt.rn.bf16x2/f16x2, mma, ldmatrix and cp.async take), the
    register-heaviest width (H = 128) in both precisions: the inline PTX is assembled by the toolkit's own
    ptxas too, not only NVRTC's (which the test above reads, every width, sm_80 and sm_90)."""
    import subprocess
    params = {"fused_mlp_forward_kernel": "const unsigned short*, int, int, const unsigned short*, const float*, "
                                          "const float*, long long, int, int, int, int, int, float*, unsigned short*, "
                                          "int, const float*, unsigned short*, double*, const double*, "
                                          "const float*, int",
              "fused_mlp_backward_kernel": "const unsigned short*, int, const unsigned short*, int, const float*, "
                                           "long long, int, int, const unsigned short*, unsigned short*"}
    unit = tmp_path / "fused_instances.cu"
    unit.write_text('#include "fused_mlp.cu"\n' + "".join(
        f"template __global__ void {kernel}<{tag}, 128>({p});\n" for tag in ("TcBf16", "TcFp16")
        for kernel, p in params.items()) + "".join(
        f"template __global__ void fused_mlp_round_kernel<{tag}>(const float*, int, int, unsigned short*, int, "
        f"int);\n"
        for tag in ("TcBf16", "TcFp16")))
    result = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_80", "-cubin", "-I", str(cuda_sources.kernels_dir()),
                             "-Xptxas", "-v", str(unit), "-o", str(tmp_path / "k.cubin")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Compiling entry function") == 6, result.stderr
    assert not re.search(r"[1-9]\d* bytes spill", result.stderr), result.stderr
