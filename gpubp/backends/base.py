"""The backend interface: the kernel set of SPEC section 3 and the few array utilities around it.

Layers, losses and optimizers are written once against this class; the numpy, cupy and numba backends each
implement it. Arrays are the backend's own (numpy.ndarray, cupy.ndarray, numba DeviceNDArray), C-contiguous,
of the model's dtype (float32 or float64). Every op writes into the output buffers it is given and allocates
nothing, so that a train step at a fixed batch size allocates nothing after its first call.

Shapes (rows are samples):  A_prev (N, in)   W (out, in)   b (out,)   Z, A, dA, delta (N, out)

    dense_forward   Z = A_prev · Wᵀ + b,  A = g(Z)
    activation_mask δ = dA ⊙ g'(Z)
    weight_grad     dW = δᵀ · A_prev,  db = Σₙ δₙ          (overwrite, or += when accumulate=True)
    input_grad      dA_prev = δ · W
    input_grad_masked  δ_prev = (δ · W) ⊙ g'(Z_prev)      (the two above, fused)
    loss_grad       L = loss(F(Z), y),  δ = ∂L/∂Z          (output activation, loss and its gradient, fused)
    sgd_update      θ ← θ − η·(PyTorch SGD direction)      (in place, over the whole flat buffer, guarded)
    adam_update     θ ← θ − η·m̂/(√v̂ + ε)                   (in place, over the whole flat buffer, guarded)

The training loop's device-side ops (issue 11: no host synchronisation per step; gpubp/guard.py has the guard's
layout and the order of a step):
    gather_rows     out = src[order[cursor : cursor + n]]  (a batch from device-resident data)
    advance_cursor  cursor += n
    guard_loss      a non-finite loss sets the guard's fault (the gradients: the guarded update's first check)
    record_step     the step's loss, correct predictions and rows added to the guard's sums
    upload_chunk, release_chunk   fit's streamed chunks of host data, copied in order with the steps that read them

Mixed precision (issue 12; gpubp/precision.py has the names and the numpy rounding). The GEMM ops take
`precision` ("fp32", "tf32", "bf16", "fp16"; "fp32" means the model dtype's own arithmetic, and float64 models
always pass it). round_p is precision.round_operand (RNE); "store" rounds RNE to the output array's dtype.
    float32 always   parameters, gradients, optimizer state, Z, the output layer's A (the prediction), the loss,
                     the staged X
    storage_dtype(p) every hidden layer's A and every layer's δ (16-bit for bf16/fp16, float32 for fp32/tf32);
                     an op writes into whatever dtype its output array has
    dense_forward     Z = round_p(A_prev) · round_p(W)ᵀ + b  (float32 accumulation),  A = store(g(Z))
    input_grad_masked δ_prev = store((round_p(δ) · round_p(W)) ⊙ g'(Z_prev)); g' from Z_prev (relu, leaky_relu)
                      or from the stored A_prev (sigmoid, tanh), in float32
    weight_grad       dW = round_p(δ)ᵀ · round_p(A_prev) (float32 accumulation),  db = Σₙ δₙ of the stored δ
    loss_grad         δ_out = store(scale · ∂L/∂Z), scale the fp16 loss scale (gpubp/loss_scale.py), else 1
For 16-bit stored arrays round_p is exact; tf32 stores nothing narrow and rounds operands inside the GEMM.
W may come either way: the float32 master (the op rounds it) or already in storage_dtype(p) (read as it is;
the same numerics, since rounding a 16-bit value again is exact). A bf16/fp16 model passes the latter:
    round_to_storage  dst = store(src)  (src (P,) float32, dst (P,) storage_dtype(p): one op over the whole flat
                      parameter buffer at the start of every forward, gpubp/network.py; dense_forward and
                      input_grad_masked of that step then read each layer's W from its view of dst)

The fully fused MLP (issue 13; gpubp/fused.py says which models qualify and holds the numpy reference of the
kernels' numerics). A backend with FUSED = True runs a whole qualifying bf16/fp16 model in two ops, layers
l = 0 .. L (L hidden, each at most H wide: H = gpubp.fused.kernel_width, the kernels' instance; narrower layers
are zero-padded, fused.py), A_0 = X, with the layers' real-shaped W/b views of the flat parameter buffer. hidden
and deltas are (L, N, H) blocks: layer l's values in its first w_l columns, the rest padding, which only the
kernels touch (the cupy forward writes g(0) into hidden's, which its backward reads back: δ_j = 0 · g'(A_j) = 0
needs it finite; deltas' padding is written 0) and the numpy reference leaves as it was:
    fused_forward   A_{l+1} = store(g_l(round_p(A_l) · round_p(W_l)ᵀ + b_l)) for l < L, on chip;
                    out = g_L(Z_L) float32 (inference), or with a loss (training): hidden[l] = A_{l+1} stored,
                    out = F(Z_L), loss_out[0] = L, delta_out = store(scale · ∂L/∂Z_L), as loss_grad
    fused_backward  δ_l = store((round_p(δ_{l+1}) · round_p(W_{l+1})) ⊙ g_l') for l = L-1 .. 0, g_l' from the
                    STORED A_{l+1} (relu / leaky_relu: A > 0; the per-layer ops take Z > 0, which differs only
                    where 0 < Z rounds to A = 0)
    fused_train     both, then dW_l = round_p(δ_l)ᵀ · round_p(A_l), db_l = Σₙ δ_l by weight_grad (the per-layer
                    tensor-core GEMM) into the model's gradient views: the whole train step's gradients
A model the backend's fused path cannot run is the caller's to refuse (gpubp.fused.qualifies; Sequential does).

Activations and losses are passed as the integer ids of gpubp.activations and gpubp.losses. Optimizer settings
arrive as a device float64 array `hyper` (read by the kernels, so a changed learning rate needs no recapture).

Every backend counts what crosses between host and device in `counters` (tests read them): "sync" (the host
waited for the device), "d2h" (device-to-host copies) and "h2d" (host-to-device copies).

Other libraries' device arrays (torch.cuda, jax, cupy under numba) come in through `adopt`: a view through
__cuda_array_interface__ or DLPack, never a copy through the host.
"""

# DLPack device types (dlpack.h's DLDeviceType) whose memory a CUDA kernel can read: kDLCUDA, kDLCUDAManaged.
# kDLCUDAHost (3) is pinned host memory: treated as a host array.
DLPACK_CUDA = (2, 13)


def dlpack_device(x):
    """(device type, device id) from x.__dlpack_device__(), or None where x has no DLPack device."""
    method = getattr(type(x), "__dlpack_device__", None)
    if method is None:
        return None
    device_type, device_id = method(x)
    return int(device_type), int(device_id)


def cuda_array_interface(x, what):
    """x.__cuda_array_interface__, or None where x has none. Some objects define it but refuse to give it (a
    torch tensor that requires grad): TypeError naming `what` and the library's reason."""
    try:
        return getattr(x, "__cuda_array_interface__", None)
    except Exception as exc:
        raise TypeError(f"{what}: a {type(x).__name__} that cannot be shared ({type(exc).__name__}: {exc}); for a "
                        "torch tensor pass tensor.detach()") from None


class Backend:
    """Base class; a backend sets `name` and implements every method below."""

    name = "base"
    # The GEMM precisions this backend implements (gpubp/precision.py); Sequential refuses the others.
    PRECISIONS = ("fp32",)

    def __init__(self, deterministic=False):
        # deterministic=True: every op must give bit-identical results run to run (no atomics in reductions).
        self.deterministic = bool(deterministic)
        self.counters = {"sync": 0, "d2h": 0, "h2d": 0}

    # ---- arrays ------------------------------------------------------------------------------------------
    def empty(self, shape, dtype):
        """An uninitialised C-contiguous device array."""
        raise NotImplementedError

    def zeros(self, shape, dtype):
        raise NotImplementedError

    def is_device_array(self, x):
        """True when `x` is an array this backend uses without a host round trip."""
        raise NotImplementedError

    def asarray(self, x, dtype):
        """`x` (numpy or a device array of this backend) as a C-contiguous device array of `dtype`; no copy when
        it already is one."""
        raise NotImplementedError

    def adopt(self, x, what="array"):
        """`x` as this backend's own device array when it is another library's array in this backend's device
        memory (a torch.cuda tensor, a jax array, a cupy array under numba): a view of the same memory, no copy.
        Anything else comes back unchanged (numpy arrays, lists, CPU tensors), to be checked and copied as
        usual. ValueError naming `what` for an array on another device of this kind. The default, the numpy
        backend's, changes nothing: numpy reads CPU tensors through __array__ without a copy."""
        return x

    def copy_into(self, dst, src):
        """dst[...] = src, where src is a numpy array or a device array of the same shape; cast to dst's dtype."""
        raise NotImplementedError

    def stage(self, x, buf):
        """`x` itself when it is a C-contiguous device array of buf's dtype and shape (used in place, no copy);
        otherwise x copied into `buf`, and `buf`."""
        flags = getattr(x, "flags", None)
        if (self.is_device_array(x) and x.dtype == buf.dtype and tuple(x.shape) == tuple(buf.shape)
                and flags is not None and flags["C_CONTIGUOUS"]):
            return x
        self.copy_into(buf, x)
        return buf

    def to_numpy(self, x):
        """A numpy copy of a device array (synchronises)."""
        raise NotImplementedError

    def view(self, flat, offset, shape):
        """A view of `flat[offset : offset + prod(shape)]` with `shape` (the per-layer views of a flat buffer)."""
        raise NotImplementedError

    def all_finite(self, x):
        """True when every element of `x` is finite (a host bool; synchronises)."""
        raise NotImplementedError

    def all_finite_many(self, arrays):
        """True when every element of every array is finite: one host bool. A GPU backend should reduce all of
        them on the device and synchronise once (a train step calls this once)."""
        return all(self.all_finite(a) for a in arrays)

    def one_hot(self, labels, classes, out):
        """out[n, :] = 0, out[n, labels[n]] = 1. `labels` is an integer numpy or device array of shape (N,). A label
        outside [0, classes) gives a row of NaN, so that a bad label the host never read makes the loss
        non-finite and the step's guard reports it."""
        raise NotImplementedError

    def storage_dtype(self, precision):
        """The dtype of the arrays a GEMM of `precision` reads narrow: hidden activations A and every δ (see the
        module docstring). float32 for fp32/tf32; a backend picks its 16-bit type for bf16/fp16 (numpy:
        ml_dtypes.bfloat16 and float16; the GPU backends may keep raw bits as uint16). gpubp.precision.decode
        turns a host copy of either into float32."""
        from .. import precision as P
        return P.storage_dtype(precision)

    def synchronize(self):
        """Wait until every launched op has finished (for timing)."""

    def free_memory(self):
        """Bytes of device memory free for data (fit streams data larger than a share of it), or None when the
        data is in host memory anyway (numpy)."""
        return None

    # ---- the kernel set ----------------------------------------------------------------------------------
    def dense_forward(self, A_prev, W, b, act, alpha, Z, A, precision="fp32"):
        """Z = A_prev · Wᵀ + b and A = g(Z) (b may be None: no bias). Z is kept for backward; where
        act == IDENTITY and A has Z's dtype, A may be the same array as Z."""
        raise NotImplementedError

    def activation_mask(self, dA, Z, A, act, alpha, delta):
        """δ = dA ⊙ g'(Z). delta may be the same array as dA."""
        raise NotImplementedError

    def weight_grad(self, delta, A_prev, dW, db, accumulate=False, precision="fp32"):
        """dW (=|+=) δᵀ · A_prev, db (=|+=) Σₙ δₙ (db may be None: no bias)."""
        raise NotImplementedError

    def input_grad(self, delta, W, dA_prev, precision="fp32"):
        """dA_prev = δ · W."""
        raise NotImplementedError

    def round_to_storage(self, src, dst, precision):
        """dst = store(src): src (P,) float32, dst (P,) in storage_dtype(precision) (bf16 or fp16), rounded RNE as
        gpubp.precision.round_operand does (inf/NaN kept, overflow to inf). One launch, allocates nothing."""
        raise NotImplementedError

    def input_grad_masked(self, delta, W, Z_prev, A_prev, act, alpha, delta_prev, precision="fp32"):
        """δ_prev = (δ · W) ⊙ g'(Z_prev): input_grad with the previous layer's activation-derivative mask fused
        into its epilogue (one pass over δ_prev instead of two). This default runs the two ops in turn, which is
        exact only where δ_prev is float32 (a 16-bit δ_prev would be rounded twice)."""
        self.input_grad(delta, W, delta_prev, precision)
        self.activation_mask(delta_prev, Z_prev, A_prev, act, alpha, delta_prev)

    def loss_grad(self, loss, act, alpha, Z, y, A, delta, loss_out, scale=None):
        """The fused output step. From the output layer's pre-activation Z (N, out) and targets y (N, out):
        A = F(Z) (the prediction), loss_out[0] = L, delta = ∂L/∂Z. The forms (SPEC section 1):
            MSE        L = (1/N) Σₙ ½‖F(Zₙ) − yₙ‖²       δ = (A − y)/N ⊙ F'(Z)
            BCE        (act must be SIGMOID) L = mean over N·out of BCE-with-logits   δ = (σ(Z) − y)/(N·out)
            SOFTMAX_CE (act must be IDENTITY) L = (1/N) Σₙ −Σₖ yₙₖ log softmax(Zₙ)ₖ    δ = (softmax(Z) − y)/N
        loss_out is a device array of shape (1,) in the model's dtype. scale: None, or a device float64 array (1,)
        (the fp16 loss scale, gpubp/loss_scale.py): delta = scale · ∂L/∂Z then, stored in delta's dtype; the loss
        itself is never scaled."""
        raise NotImplementedError

    # The two updates are guarded (gpubp/guard.py): with guard[FAULT] set they do nothing. Else, checked in this
    # order, the first of these writes nothing and sets guard[FAULT], guard[FAULT_STEP] = guard[STEP] and
    # guard[FAULT_INDEX] = the smallest bad flat index in that buffer:
    #     a non-finite gradient (grads as given, before weight decay is added)    guard.GRADIENT
    #     an update that would leave a parameter non-finite                      guard.PARAMS
    #     ... or a value of state buffer k (its position in the signature)       guard.STATE + k
    # Otherwise it is applied, and step[0] and guard[STEP] go up by one. This is the step's only gradient check
    # (guard_loss checks the loss): a GPU backend makes it in the pass that computes the update, where every
    # gradient is read anyway. `step` is a device int64 array (1,), the updates done so far. `hyper` a device
    # float64 array.
    SGD_HYPER = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
    ADAM_HYPER = ("lr", "beta1", "beta2", "eps", "weight_decay")

    def sgd_update(self, params, grads, momentum_buf, step, hyper, guard):
        """torch.optim.SGD's rule over the flat buffers, in place; hyper = [lr, μ, dampening, wd, nesterov]:
            g = grad + wd·θ
            if μ: b = g when step == 0 else μ·b + (1 − dampening)·g;  g = g + μ·b if nesterov else b
            θ = θ − lr·g
        State buffer 0: the momentum buffer b (untouched when μ = 0)."""
        raise NotImplementedError

    def adam_update(self, params, grads, m, v, step, hyper, guard):
        """torch.optim.Adam's rule over the flat buffers, in place; hyper = [lr, β1, β2, ε, wd]; t = step[0] + 1:
            g = grad + wd·θ;  m = β1·m + (1 − β1)·g;  v = β2·v + (1 − β2)·g²
            θ = θ − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + ε)
        State buffers 0 and 1: m and v."""
        raise NotImplementedError

    # ---- the fully fused MLP (gpubp/fused.py; module docstring) ---------------------------------------------
    # True where fused_forward and fused_backward are implemented; Sequential(fused="auto") takes the fused path
    # then, for models gpubp.fused.qualifies accepts.
    FUSED = False

    def fused_forward(self, X, Ws, bs, act_ids, alphas, precision, out, hidden=None, loss=None, Y=None,
                      delta_out=None, loss_out=None, scale=None):
        """The fused forward of layers W_l (out_l, in_l) / b_l (or None) / act_ids[l] / alphas[l], l = 0 .. L,
        on X (N, in) float32, in `precision` (bf16 or fp16). Inference (hidden None, loss None): out (N, O)
        float32 = g_L(Z_L). Training (hidden (L, N, H) in the storage dtype, H = fused.kernel_width, loss a loss
        id, Y (N, O) float32 targets, one-hot for softmax_ce): hidden[l][:, :w_{l+1}] = A_{l+1} (the rest is
        padding, module docstring); out = F(Z_L) (the prediction); loss_out[0] = L
        (the unscaled loss, (1,) float32); delta_out (N, O) stored = store(scale · ∂L/∂Z_L); scale None (1) or a
        device float64 (1,) (the fp16 loss scale), as loss_grad."""
        raise NotImplementedError(f"backend {self.name!r} has no fused MLP path")

    def fused_backward(self, delta_out, Ws, act_ids, alphas, precision, hidden, deltas):
        """The fused backward: from delta_out (N, O) stored and the forward's hidden (L, N, H), deltas (L, N, H)
        stored: deltas[l][:, :w_{l+1}] = δ_l = store((δ_{l+1} · round_p(W_{l+1})) ⊙ g_l'(from hidden[l])),
        l = L-1 .. 0 (the rest is padding)."""
        raise NotImplementedError(f"backend {self.name!r} has no fused MLP path")

    def fused_train(self, X, Y, loss, Ws, bs, act_ids, alphas, precision, out, hidden, deltas, delta_out, loss_out,
                    dWs, dbs, scale=None):
        """Forward with the loss, backward, and every layer's weight gradient (module docstring): dWs[l] =
        round_p(δ_l)ᵀ · round_p(A_l) and dbs[l] (or None) = Σₙ δ_l, with A_0 = X, A_l = hidden[l - 1] and δ_L =
        delta_out; overwritten, multiplied by the loss scale as every δ is."""
        self.fused_forward(X, Ws, bs, act_ids, alphas, precision, out, hidden, loss, Y, delta_out, loss_out, scale)
        self.fused_backward(delta_out, Ws, act_ids, alphas, precision, hidden, deltas)
        self._fused_weight_grads(X, hidden, deltas, delta_out, dWs, dbs, precision)

    def _fused_weight_grads(self, X, hidden, deltas, delta_out, dWs, dbs, precision):
        """fused_train's last part: weight_grad for every layer from the fused kernels' stored A and δ."""
        L = len(dWs) - 1
        for l in range(L + 1):
            delta = delta_out if l == L else deltas[l]
            self._padded_weight_grad(delta, X if l == 0 else hidden[l - 1], dWs[l], dbs[l], precision)

    def _padded_weight_grad(self, delta, A_prev, dW, db, precision):
        """dW (out, in) = δᵀ · A_prev and db = Σₙ δ (overwritten) from delta (N, >= out) and A_prev (N, >= in)
        whose columns past dW's shape are the fused kernels' padding: here weight_grad on the real columns'
        views. A backend whose weight_grad takes only contiguous arrays replaces this."""
        n_out, n_in = dW.shape
        self.weight_grad(delta[:, :n_out], A_prev[:, :n_in], dW, db, precision=precision)

    # ---- the training loop's device-side ops (gpubp/guard.py) --------------------------------------------
    def gather_rows(self, src, order, cursor, out):
        """out[i, :] = src[order[cursor[0] + i], :] for i < out.shape[0]. src (M, F) of out's dtype, order (M,)
        int64 (a permutation of the rows), cursor (1,) int64; all device arrays. The cursor is not moved."""
        raise NotImplementedError

    def advance_cursor(self, cursor, n):
        """cursor[0] += n, on the device (after every gather of a batch has read it)."""
        raise NotImplementedError

    def guard_loss(self, loss_out, guard):
        """After backward, before the update: if guard[FAULT] is set, guard[SKIPPED] += 1 (the update then does
        nothing). Else, when loss_out[0] is not finite: FAULT = LOSS, FAULT_INDEX = -1, FAULT_STEP = guard[STEP].
        loss_out (1,) in the model's dtype. The gradients are checked by the guarded update (sgd_update,
        adam_update), with no pass of their own."""
        raise NotImplementedError

    def record_step(self, loss, loss_out, A, Y, guard):
        """After the update, when guard[FAULT] is not set (the step was good): with n = A.shape[0],
        guard[LOSS_SUM] += loss_out[0]·n; guard[ROWS] += n; guard[RING + (guard[STEP] − 1) % RING_SIZE] =
        loss_out[0]; and guard[CORRECT] += accuracy·n, where accuracy is gpubp.losses.accuracy(loss, A, Y)
        computed as numpy does (a count divided by the elements compared, in float64), 0 for mse."""
        raise NotImplementedError

    # ---- fp16 dynamic loss scaling (gpubp/loss_scale.py has the scaler's layout and rule) ------------------
    def unscale_gradients(self, loss_out, grads, scaler, guard):
        """guard_loss for a loss-scaled step: if guard[FAULT] is set, guard[SKIPPED] += 1; else a non-finite
        loss sets FAULT = LOSS (a real fault, as guard_loss); else grads *= 1/scaler[SCALE] and, when a
        gradient is not finite (the scaled δ overflowed), FAULT = OVERFLOW, FAULT_STEP = guard[STEP],
        FAULT_INDEX = the smallest such flat index: the update skips the step and update_scale clears it."""
        raise NotImplementedError

    def update_scale(self, scaler, guard):
        """After the update, before record_step: guard[FAULT] == OVERFLOW: the fault is cleared (FAULT = NONE,
        FAULT_STEP = 0, FAULT_INDEX = -1) and guard[STEP] += 1 (the step counts as taken, its update skipped, so
        record_step then records its loss as for any step), SCALE *= BACKOFF, GOOD = 0, OVERFLOWS += 1.
        guard[FAULT] == NONE: GOOD += 1, and when GOOD reaches GROWTH_INTERVAL, SCALE *= GROWTH (not above
        loss_scale.MAX_SCALE) and GOOD = 0. Any other fault: nothing (the host reports it)."""
        raise NotImplementedError

    # ---- streamed data: fit's chunks when the data stays on the host (gpubp/network.py, DeviceData) ----------
    def upload_chunk(self, slot, copies):
        """One chunk of host data into the device buffers of `slot` (a small int naming one set of chunk
        buffers): for each (dst, src, rows) in copies, dst[:len(rows)] = src[rows] (rows None: dst[...] = src),
        src a numpy array. Ops launched after this call see the new values; the copy overwrites dst only after
        the ops that read the slot's buffers before are done (those launched before release_chunk(slot); every
        op launched so far when the slot was not released). The default copies in stream order, which gives
        both; a GPU backend may copy on a second stream from pinned host memory while the device computes."""
        for dst, src, rows in copies:
            if rows is None:
                self.copy_into(dst, src)
            else:
                self.copy_into(dst[:len(rows)], src[rows])

    def release_chunk(self, slot):
        """Every op that reads the buffers of chunk `slot` is launched (see upload_chunk). Default: nothing."""

    # ---- whole-step hooks (a backend may replace eager launches by a captured graph) ---------------------
    def run_step(self, key, fn):
        """Run `fn()`, a closure that launches a fixed sequence of ops on fixed buffers. `key` identifies that
        sequence (shapes, loss, optimizer settings, and the buffers it reads): a GPU backend may capture it once
        as a CUDA graph and replay it for later calls with the same key. key None: the closure reads buffers
        that may differ from call to call (a caller's device array used in place), so it must run eagerly.
        The default always runs it eagerly."""
        fn()
