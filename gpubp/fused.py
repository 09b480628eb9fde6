"""The fully fused MLP (issue 13, kernels/fused_mlp.cu): which models qualify, how their weights are laid out
for the kernels (zero-padded), and the numpy reference of its forward and backward in the kernel's numerics.

A model qualifies when its GEMMs run in a 16-bit precision (bf16 or fp16), it has at least one hidden layer,
every hidden layer is at most MAX_HIDDEN = 128 wide, and its output width is at most MAX_OUTPUT. The input
width is free (the kernel streams the input layer through shared memory 32 columns at a time and zero-pads the
last slice). Layers, in the seed's notation, for a model of L + 1 Dense layers (L hidden, widths w_1 .. w_L):

    layer 0         Z_0 = A_in · W_0ᵀ + b_0          W_0 (w_1, in)        A_1 = g_0(Z_0)
    layer l < L     Z_l = A_l · W_lᵀ + b_l           W_l (w_{l+1}, w_l)   A_{l+1} = g_l(Z_l)
    layer L         Z_L = A_L · W_Lᵀ + b_L           W_L (out, w_L)       output g_L(Z_L), or Z_L (training)

Widths and padding. The kernels are built for one hidden width H in FUSED_WIDTHS (the template parameter). A
model runs on the smallest H >= its widest hidden layer (kernel_width), every hidden layer zero-padded to H by
the caller (padded_shapes): W_l gets zero rows past w_{l+1} (and its bias zeros there), the layer after it zero
columns past w_{l+1}. Why the real units come out as unpadded: a padded unit j has Z_j = 0 and A_j = g(0), which
is not 0 for sigmoid (0.5), but the only weights that ever multiply A_j are the next layer's column j, all 0, so
A_j adds an exact 0 to every product; in backward dA_j = δ · (that zero column) = 0, so δ_j = 0 whatever g'(A_j)
is. The real outputs equal the unpadded computation up to the order of the float32 accumulation, which only
adds exact zeros (an inf among the activations may turn into NaN: non-finite either way). The reference below
works on the real (unpadded) shapes; the tests compare the padded kernels with it. The weight gradients are
taken on the real columns only. Cost (padding_fraction): the kernels do H-wide work for every hidden layer, and
a training step, bound by the stored (N, H) A and δ, costs about what the all-H model costs.

Numerics (the contract between kernel and reference; names from gpubp/precision.py, P = bf16 or fp16):
  - every GEMM operand is P: the input A_in = round_P(X), the weights round_P(W_l) (the caller converts them),
    each hidden activation A_{l+1} = round_P(g_l(Z_l)) (stored once, as 16 bits, and reused as is both by the
    next layer and by backward), the output-layer seed δ_L = round_P(∂L/∂Z_L), each hidden δ_l likewise;
  - products are accumulated in float32 (reference_gemm: the exact product of the rounded operands, rounded
    once), the bias (float32) is added to the float32 sum, g is evaluated in float32;
  - the output layer's Z_L (training) and g_L(Z_L) (inference) are float32, never rounded to P; with the loss
    fused (output_loss), A = F(Z_L) and the loss are float32/float64 as gpubp/losses.py computes them, and
    only δ_L = S · ∂L/∂Z_L is rounded to P (it is backward's first GEMM operand; S the fp16 loss scale);
  - this is gpubp/backends/base.py's mixed-precision contract for the per-layer ops, with one difference that
    the fused kernel cannot avoid (it keeps no Z): relu and leaky_relu take their mask from the stored A (below),
    not from Z; the two differ only where 0 < Z rounds to A = 0 (fp16: Z < 2^-25; bf16: below float32's
    subnormals' half), where the fused gradient is 0 and the per-layer one dA.
  - backward: δ_l = round_P((δ_{l+1} · W_{l+1}) ⊙ g_l'), with g_l' taken from the STORED (rounded) A_{l+1}:
    relu and leaky_relu use A > 0 (⇔ Z > 0, except where a positive Z below P's smallest subnormal rounded
    to 0, which then counts as Z = 0: gradient 0, the seed's rule at 0), sigmoid A(1 − A), tanh 1 − A².
    The weight gradients dW_l = δ_lᵀ · A_l and db_l = Σ δ_l are the per-layer tensor-core GEMM's job.
"""
import numpy as np

from . import activations as acts
from . import precision as prec

FUSED_PRECISIONS = ("bf16", "fp16")
FUSED_WIDTHS = (16, 32, 48, 64, 128)   # hidden widths with a kernel instance (template parameter H)
MAX_HIDDEN = FUSED_WIDTHS[-1]          # the widest hidden layer: narrower ones are zero-padded to an instance
MAX_OUTPUT = 128                       # output width bound: the output layer's weights fit the weight buffer
MAX_LAYERS = 16                        # activation ids are packed 3 bits a layer into one 64-bit argument
ROWS_PER_BLOCK = 128                   # 8 warps x 16 rows


def _describe(layer):
    return f"Dense({layer.n_in}, {layer.n_out})"


def qualifies(layers, precision):
    """(True, "") when kernels/fused_mlp.cu can run this model in `precision`, else (False, why not), the reason
    naming the layer and what would make it qualify. `layers`: Dense-like objects (n_in, n_out, act)."""
    layers = list(layers)
    if precision not in FUSED_PRECISIONS:
        return False, (f"precision {precision!r}: the fused MLP multiplies 16-bit operands only "
                       f"({', '.join(FUSED_PRECISIONS)}); use precision='bf16' or 'fp16', or the per-layer kernels")
    if len(layers) < 2:
        return False, "a single layer has no hidden activations to keep on chip: the per-layer GEMM serves it"
    if len(layers) > MAX_LAYERS:
        return False, f"{len(layers)} layers: the fused kernel takes at most {MAX_LAYERS}"
    for i in range(1, len(layers)):
        if layers[i].n_in != layers[i - 1].n_out:
            return False, f"layer {i} ({_describe(layers[i])}) does not take layer {i - 1}'s output"
    for i, layer in enumerate(layers[:-1]):
        if layer.n_out > MAX_HIDDEN:
            return False, (f"layer {i} ({_describe(layer)}): hidden width {layer.n_out}: the fused kernel takes "
                           f"hidden widths up to {MAX_HIDDEN} (each warp keeps a 16 x H accumulator tile in "
                           f"registers, H in {list(FUSED_WIDTHS)}; narrower layers are zero-padded to the next H)")
    out = layers[-1].n_out
    if not 1 <= out <= MAX_OUTPUT:
        return False, (f"output width {out}: the fused kernel takes at most {MAX_OUTPUT} outputs (the output "
                       f"layer's weights share the hidden layers' shared-memory buffer)")
    if layers[0].n_in < 1:
        return False, "input width 0"
    return True, ""


def kernel_width(hidden_widths):
    """H, the kernel instance a model runs on: the smallest of FUSED_WIDTHS at least as wide as its widest hidden
    layer (hidden_widths: w_1 .. w_L, ints)."""
    widest = max(hidden_widths)
    for H in FUSED_WIDTHS:
        if H >= widest:
            return H
    raise ValueError(f"hidden width {widest}: the fused kernels take hidden widths up to {MAX_HIDDEN}")


def padded_shapes(shapes):
    """The kernels' layout of a model whose weights W_0 .. W_L have `shapes` [(out_l, in_l)]: the (rows, cols)
    each W_l takes in the weight buffer, back to back, zeros past (out_l, in_l); rows is also the length of its
    bias in the bias buffer (zeros past out_l). Hidden layers have H rows (kernel_width), the layers after the
    first H columns; W_0 keeps the input width, W_L the output width."""
    shapes = [tuple(int(n) for n in s) for s in shapes]
    L = len(shapes) - 1
    H = kernel_width(out for out, _ in shapes[:L])
    return [(H if l < L else out, n_in if l == 0 else H) for l, (out, n_in) in enumerate(shapes)]


def padding_fraction(layers):
    """The share of the fused kernels' weight multiply-adds spent on padding (0 when every hidden width has its
    own instance): 1 − Σ out_l·in_l / Σ rows_l·cols_l over padded_shapes. E.g. 50-50 hidden (H = 64): 0.39 of
    the hidden-to-hidden product. The stored A and δ are H wide too, and they bound a training step's memory
    traffic: read the step's time as that of the all-H model."""
    shapes = [(layer.n_out, layer.n_in) for layer in layers]
    real = sum(out * n_in for out, n_in in shapes)
    return 1.0 - real / sum(rows * cols for rows, cols in padded_shapes(shapes))


def _check(X, Ws, bs, act_ids):
    if not (len(Ws) == len(bs) == len(act_ids)) or len(Ws) < 2:
        raise ValueError(f"expected as many weights, biases and activations (>= 2 layers), got {len(Ws)}, "
                         f"{len(bs)}, {len(act_ids)}")
    if X.ndim != 2 or X.shape[1] != Ws[0].shape[1]:
        raise ValueError(f"X: expected (N, {Ws[0].shape[1]}), got {X.shape}")


def forward(X, Ws, bs, act_ids, alphas, precision, training=False):
    """The fused forward in the kernel's numerics (module docstring).

    X (N, in); Ws[l] (out_l, in_l) float32 (rounded to `precision` here, as the caller's conversion does);
    bs[l] (out_l,) float32 or None; act_ids[l] / alphas[l] per layer. Returns (hidden, out): hidden = [A_1,
    ..., A_L] as float32 arrays holding P values (what the kernel stores as 16 bits, in training mode), and
    out (N, out) float32: Z_L when training, g_L(Z_L) otherwise."""
    X = np.asarray(X, np.float32)
    _check(X, Ws, bs, act_ids)
    A = prec.round_operand(X, precision)
    hidden = []
    for l, (W, b) in enumerate(zip(Ws, bs)):
        if l == len(Ws) - 1:
            return hidden, output_layer(A, W, b, act_ids[l], alphas[l], precision, training)
        A = hidden_layer(A, W, b, act_ids[l], alphas[l], precision)
        hidden.append(A)


def _z(A, W, b, precision):
    """Z = A · Wᵀ + b: the product of the P-rounded operands accumulated exactly, rounded once to float32
    (reference_gemm), then the float32 bias added in float32."""
    Z = prec.reference_gemm(A, W, precision)
    return Z + np.asarray(b, np.float32) if b is not None else Z


def hidden_layer(A, W, b, act, alpha, precision):
    """One hidden layer of the fused forward: round_P(g(A · Wᵀ + b)), as the kernel stores it."""
    return prec.round_operand(acts.forward(act, _z(A, W, b, precision), np.float32(alpha)), precision)


def output_layer(A, W, b, act, alpha, precision, training):
    """The output layer: Z_L (training) or g_L(Z_L), float32, never rounded to P."""
    Z = _z(A, W, b, precision)
    return (Z if training else acts.forward(act, Z, np.float32(alpha))).astype(np.float32)


def output_loss(Z, y, loss, act, alpha, precision, scale=1.0):
    """The loss fused into the forward's output layer (training): from Z_L (N, O) float32 and targets y (N, O),
    (A, δ_L, L): A = F(Z_L) and the float32 gradient ∂L/∂Z_L by gpubp/losses.py's loss_grad, times the loss
    scale in float32 (fp16's S, gpubp/loss_scale.py; the numpy backend's order), then rounded to P: δ_L, what
    the kernel stores for backward; L the unscaled loss (float). The kernel writes each row's share of L."""
    from . import losses
    Z = np.ascontiguousarray(Z, np.float32)
    A, delta = np.empty_like(Z), np.empty_like(Z)
    value = losses.loss_grad(loss, act, np.float32(alpha), Z, np.asarray(y, np.float32), A, delta)
    delta *= np.float32(scale)
    return A, prec.round_operand(delta, precision), value


def hidden_delta(delta_next, W_next, A, act, alpha, precision):
    """One step of the fused backward: round_P((δ_{l+1} · W_{l+1}) ⊙ g'(from the stored A_{l+1}))."""
    dA = prec.reference_gemm(delta_next, np.ascontiguousarray(np.asarray(W_next, np.float32).T), precision)
    A = np.asarray(A, np.float32)
    # relu / leaky_relu: the mask from A (A > 0 <=> Z > 0 for the stored activation), as the kernel has no Z
    masked = acts.derivative_mask(act, dA, A, A, np.float32(alpha))
    return prec.round_operand(masked, precision)


def backward(delta_out, Ws, hidden, act_ids, alphas, precision):
    """The fused backward: [δ_0, ..., δ_{L-1}] (float32 arrays holding P values; δ_l = ∂L/∂Z_l of hidden layer
    l), from δ_out = ∂L/∂Z_L (rounded to P here, as the kernel takes it) and the forward's hidden activations."""
    delta = prec.round_operand(delta_out, precision)
    deltas = [None] * len(hidden)
    for l in range(len(hidden) - 1, -1, -1):
        delta = hidden_delta(delta, Ws[l + 1], hidden[l], act_ids[l], alphas[l], precision)
        deltas[l] = delta
    return deltas


def weight_gradients(X, hidden, deltas, delta_out, precision):
    """dW_l = δ_lᵀ · A_l and db_l = Σ δ_l for every layer (A_0 = round_P(X); the output layer's δ is δ_out
    rounded): what the per-layer tensor-core GEMM computes from the fused kernels' outputs."""
    inputs = [prec.round_operand(X, precision)] + list(hidden)
    all_deltas = list(deltas) + [prec.round_operand(delta_out, precision)]
    grads = []
    for A, d in zip(inputs, all_deltas):
        grads.append({"W": prec.reference_gemm(np.ascontiguousarray(d.T), np.ascontiguousarray(A.T), precision),
                      "b": d.astype(np.float64).sum(axis=0).astype(np.float32)})
    return grads


def pack_activations(act_ids):
    """The kernels' `acts` argument: 3 bits a layer, layer l at bits 3l..3l+2."""
    packed = 0
    for l, a in enumerate(act_ids):
        packed |= int(a) << (3 * l)
    return np.int64(packed)


def pack_bias_mask(bs):
    """The kernels' `bias_mask` argument: bit l set where layer l has a bias."""
    return np.int32(sum(1 << l for l, b in enumerate(bs) if b is not None))
