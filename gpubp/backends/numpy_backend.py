"""The numpy backend: the readable reference every other backend is tested against. Runs anywhere, float32
and float64. Each op writes into the buffers it is given (out=), so a train step allocates little."""
import contextlib
import math

import numpy as np

from .. import activations as acts
from .. import fused
from .. import guard as G
from .. import loss_scale as LS
from .. import losses
from .. import precision as P
from .base import Backend


class NumpyBackend(Backend):
    name = "numpy"
    PRECISIONS = P.PRECISIONS

    def __init__(self, deterministic=False):
        super().__init__(deterministic)
        self._buffers = {}    # scratch arrays and ones vectors, made once per shape (see _scratch, _ones)

    # ---- arrays ------------------------------------------------------------------------------------------
    def empty(self, shape, dtype):
        return np.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype=dtype)

    def is_device_array(self, x):
        return isinstance(x, np.ndarray)

    def asarray(self, x, dtype):
        return np.ascontiguousarray(x, dtype=dtype)

    def copy_into(self, dst, src):
        self.counters["h2d"] += 1   # host and "device" are one memory here: counted as a GPU backend would
        np.copyto(dst, src, casting="unsafe")

    def to_numpy(self, x):
        self.counters["d2h"] += 1
        return np.array(x, copy=True)

    def view(self, flat, offset, shape):
        return flat[offset:offset + int(np.prod(shape))].reshape(shape)

    def all_finite(self, x):
        return bool(np.isfinite(x).all())

    def one_hot(self, labels, classes, out):
        labels = np.asarray(labels)
        bad = (labels < 0) | (labels >= classes)      # a row of NaN, as the GPU kernels (base.py)
        out.fill(0)
        out[np.flatnonzero(~bad), labels[~bad]] = 1
        out[bad] = np.nan

    # ---- the kernel set ----------------------------------------------------------------------------------
    # precision "fp32" is the model dtype's own arithmetic, straight into the output buffers. A reduced precision
    # follows base.py's contract literally: operands rounded to it (_operand), float32 products, results computed
    # in float32 and stored into the output's dtype (_store: RNE to bf16/fp16, as the kernels store).
    def dense_forward(self, A_prev, W, b, act, alpha, Z, A, precision="fp32"):
        if precision == "fp32":
            np.matmul(A_prev, W.T, out=Z)      # Z = A_prev · Wᵀ
        else:
            np.matmul(self._operand(A_prev, precision), self._operand(W, precision).T, out=Z)
        if b is not None:
            Z += b                             #   + b  (broadcast over rows)
        if A is Z:
            return
        if A.dtype == Z.dtype:
            acts.forward(act, Z, alpha, out=A)
        else:
            self._store(A, acts.forward(act, Z, alpha, out=self._scratch(Z, "act")))   # A = store(g(Z))

    def activation_mask(self, dA, Z, A, act, alpha, delta):
        if dA.dtype == Z.dtype == A.dtype == delta.dtype:
            acts.derivative_mask(act, dA, Z, A, alpha, out=delta)
        else:   # 16-bit dA, A or δ: the mask in float32 from their values, then stored
            self._store(delta, acts.derivative_mask(act, self._decoded(dA), Z, self._decoded(A, 1), alpha,
                                                    out=self._scratch(Z, "mask")))

    def weight_grad(self, delta, A_prev, dW, db, accumulate=False, precision="fp32"):
        if precision != "fp32":
            dW_new = self._operand(delta, precision).T @ self._operand(A_prev, precision)
            if accumulate:
                dW += dW_new
            else:
                dW[...] = dW_new
            if db is not None:
                d = self._decoded(delta)                       # Σₙ δₙ of the stored δ
                if accumulate:
                    db += self._ones(d) @ d
                else:
                    np.matmul(self._ones(d), d, out=db)
            return
        if accumulate:
            dW += delta.T @ A_prev
            if db is not None:
                db += self._ones(delta) @ delta
        else:
            np.matmul(delta.T, A_prev, out=dW)     # Σₙ δₙ aₙᵀ: the seed's outer products, summed
            if db is not None:
                np.matmul(self._ones(delta), delta, out=db)   # Σₙ δₙ = 1ᵀ·δ

    def input_grad(self, delta, W, dA_prev, precision="fp32"):
        if precision == "fp32":
            np.matmul(delta, W, out=dA_prev)
        else:
            self._store(dA_prev, self._operand(delta, precision) @ self._operand(W, precision))

    def input_grad_masked(self, delta, W, Z_prev, A_prev, act, alpha, delta_prev, precision="fp32"):
        if precision == "fp32":
            np.matmul(delta, W, out=delta_prev)
            acts.derivative_mask(act, delta_prev, Z_prev, A_prev, alpha, out=delta_prev)
        else:   # the GEMM and the mask in float32, one rounding when δ_prev is stored (as the fused epilogue)
            dA = self._operand(delta, precision) @ self._operand(W, precision)
            self._store(delta_prev, acts.derivative_mask(act, dA, Z_prev, self._decoded(A_prev), alpha, out=dA))

    def round_to_storage(self, src, dst, precision):
        # src (P,) float32, dst (P,) ml_dtypes.bfloat16 / float16: the reference's rounding (RNE), as round_operand
        if dst.dtype != P.storage_dtype(precision) or dst.dtype.itemsize != 2 or src.shape != dst.shape:
            raise TypeError(f"round_to_storage: expected dst of {src.shape} in precision {precision!r}'s 16-bit "
                            f"storage, got {dst.dtype} {dst.shape}")
        self._store(dst, src)

    @staticmethod
    def _operand(x, precision):
        """x as a reduced-precision GEMM multiplies it: float32 holding round_p(x) (exact for 16-bit storage)."""
        return x.astype(np.float32) if x.dtype.itemsize == 2 else P.round_operand(x, precision)

    def _decoded(self, x, which=0):
        """x's values in float32: x itself unless it is stored in 16 bits (then a scratch copy)."""
        if x.dtype.itemsize != 2:
            return x
        key = ("decoded", which, x.shape)
        if key not in self._buffers:
            self._buffers[key] = np.empty(x.shape, np.float32)
        np.copyto(self._buffers[key], x, casting="unsafe")
        return self._buffers[key]

    @staticmethod
    def _store(out, values):
        """out[...] = values rounded to out's dtype (RNE; overflow to inf is the format's, not an error)."""
        with np.errstate(over="ignore"):
            np.copyto(out, values, casting="unsafe")

    def _ones(self, delta):
        """A ones vector (N,) kept per (N, dtype). NOTE: db = 1ᵀ·δ through BLAS is about 5x faster than
        np.sum(delta, axis=0) for (4096, 64): numpy reduces over the leading axis of a C array row by row."""
        key = ("ones", delta.shape[0], delta.dtype)
        if key not in self._buffers:
            self._buffers[key] = np.ones(delta.shape[0], dtype=delta.dtype)
        return self._buffers[key]

    def _scratch(self, like, which=0):
        """A scratch array shaped like `like`, allocated once per (shape, dtype). NOTE: the optimizers write their
        temporaries here: a fresh array the size of the parameter buffer per temporary costs page faults that
        took longer than the arithmetic (measured 3-4x for 2M float32)."""
        key = ("scratch", which, like.shape, like.dtype)
        if key not in self._buffers:
            self._buffers[key] = np.empty_like(like)
        return self._buffers[key]

    def loss_grad(self, loss, act, alpha, Z, y, A, delta, loss_out, scale=None):
        if scale is None and delta.dtype == Z.dtype:
            loss_out[0] = losses.loss_grad(loss, act, alpha, Z, y, A, delta)
            return
        d = self._scratch(Z, "loss")   # δ in float32, scaled, then stored (one rounding)
        loss_out[0] = losses.loss_grad(loss, act, alpha, Z, y, A, d)
        if scale is not None:
            d *= d.dtype.type(scale[0])
        self._store(delta, d)

    # ---- the fully fused MLP: gpubp/fused.py's reference, in the kernels' numerics ------------------------------
    FUSED = True

    def fused_forward(self, X, Ws, bs, act_ids, alphas, precision, out, hidden=None, loss=None, Y=None,
                      delta_out=None, loss_out=None, scale=None):
        training = loss is not None
        layers, Z = fused.forward(X, Ws, bs, act_ids, alphas, precision, training=training)
        if not training:
            out[...] = Z
            return
        for l, A in enumerate(layers):   # the real columns; the kernel's padding past them is left as it is
            self._store(hidden[l][:, :A.shape[1]], A)
        A, delta, value = fused.output_loss(Z, Y, loss, act_ids[-1], alphas[-1], precision,
                                            1.0 if scale is None else scale[0])
        out[...] = A
        self._store(delta_out, delta)
        loss_out[0] = value

    def fused_backward(self, delta_out, Ws, act_ids, alphas, precision, hidden, deltas):
        # the reference on the real shapes: hidden layer l's first w_{l+1} = Ws[l].shape[0] columns
        layers = [np.asarray(h[:, :W.shape[0]], np.float32) for h, W in zip(hidden, Ws)]
        for l, d in enumerate(fused.backward(np.asarray(delta_out, np.float32), Ws, layers, act_ids, alphas,
                                             precision)):
            self._store(deltas[l][:, :d.shape[1]], d)

    def sgd_update(self, params, grads, momentum_buf, step, hyper, guard):
        if guard[G.FAULT] or self._fault_if_nonfinite(guard, G.GRADIENT, grads):   # the raw gradient, checked first
            return
        lr, momentum, dampening, weight_decay, nesterov = (float(h) for h in hyper)   # Python floats: float32 stays float32
        with self._rollback_on_overflow(guard, params, momentum_buf if momentum != 0 else None):
            # The temporaries of the textbook lines (g + wd·θ, (1 − dampening)·g, lr·g) go to scratch buffers.
            tmp = self._scratch(params)
            g = grads
            if weight_decay != 0:
                g = np.multiply(params, weight_decay, out=self._scratch(params, 1))
                g += grads                                    # g = grad + wd·θ
            if momentum != 0:
                if step[0] == 0:
                    momentum_buf[...] = g                     # b = g
                else:
                    momentum_buf *= momentum                  # b = μ·b + (1 − dampening)·g
                    momentum_buf += g if dampening == 0 else np.multiply(g, 1 - dampening, out=tmp)
                if nesterov:
                    g = np.add(g, np.multiply(momentum_buf, momentum, out=tmp), out=tmp)   # g = g + μ·b
                else:
                    g = momentum_buf                          # g = b
            params -= np.multiply(g, lr, out=tmp)             # θ = θ − lr·g
        self._count_good_step(step, guard)

    def adam_update(self, params, grads, m, v, step, hyper, guard):
        if guard[G.FAULT] or self._fault_if_nonfinite(guard, G.GRADIENT, grads):   # the raw gradient, checked first
            return
        lr, beta1, beta2, eps, weight_decay = (float(h) for h in hyper)
        with self._rollback_on_overflow(guard, params, m, v):
            # Temporaries go to scratch buffers; the bias corrections are Python floats, so float32 stays float32
            # (a numpy float64 scalar would promote every temporary to float64).
            t = int(step[0]) + 1
            tmp = self._scratch(params)
            g = grads
            if weight_decay != 0:
                g = np.multiply(params, weight_decay, out=self._scratch(params, 1))
                g += grads                                    # g = grad + wd·θ
            m *= beta1
            m += np.multiply(g, 1 - beta1, out=tmp)           # m = β1·m + (1 − β1)·g
            v *= beta2
            np.multiply(g, 1 - beta2, out=tmp)
            tmp *= g
            v += tmp                                          # v = β2·v + (1 − β2)·g²
            step_size = lr / (1 - beta1 ** t)
            denom = np.sqrt(v, out=tmp)
            denom /= math.sqrt(1 - beta2 ** t)
            denom += eps                                      # √v / √(1 − β2ᵗ) + ε
            update = np.divide(m, denom, out=tmp)
            update *= step_size
            params -= update                                  # θ = θ − lr/(1 − β1ᵗ) · m / denom
        self._count_good_step(step, guard)

    @contextlib.contextmanager
    def _rollback_on_overflow(self, guard, params, *state):
        """The guarded update on the CPU: keep copies of what the update writes, apply it, and when a value went
        non-finite put the copies back and record the fault (a GPU backend checks first, then applies: no copies).
        A state buffer of None is one the update does not touch."""
        buffers = [(k, b, self._scratch(b, 2 + k)) for k, b in enumerate((params, *state)) if b is not None]
        for _, b, copy in buffers:
            np.copyto(copy, b)
        with np.errstate(over="ignore", invalid="ignore"):   # overflow is what this guards against: no warning
            yield
        for k, b, _ in buffers:
            if self._fault_if_nonfinite(guard, G.PARAMS if k == 0 else G.STATE + k - 1, b):
                for _, buf, copy in buffers:
                    np.copyto(buf, copy)
                return

    @staticmethod
    def _set_fault(guard, code, index):
        guard[G.FAULT], guard[G.FAULT_STEP], guard[G.FAULT_INDEX] = code, guard[G.STEP], index

    @classmethod
    def _fault_if_nonfinite(cls, guard, code, x):
        """When x holds a NaN or inf: FAULT = code at x's smallest non-finite flat index, and True."""
        if np.isfinite(x).all():   # the fast test first: the index is wanted only after a fault
            return False
        cls._set_fault(guard, code, int(np.flatnonzero(~np.isfinite(x))[0]))
        return True

    @staticmethod
    def _count_good_step(step, guard):
        if not guard[G.FAULT]:
            step[0] += 1
            guard[G.STEP] += 1

    # ---- the training loop's device-side ops ------------------------------------------------------------
    def gather_rows(self, src, order, cursor, out):
        start = int(cursor[0])
        np.take(src, order[start:start + out.shape[0]], axis=0, out=out)

    def advance_cursor(self, cursor, n):
        cursor[0] += n

    def guard_loss(self, loss_out, guard):
        if guard[G.FAULT]:
            guard[G.SKIPPED] += 1
        elif not np.isfinite(loss_out[0]):
            self._set_fault(guard, G.LOSS, -1)

    def unscale_gradients(self, loss_out, grads, scaler, guard):
        self.guard_loss(loss_out, guard)   # a fault already set, or a non-finite loss: nothing is unscaled
        if guard[G.FAULT]:
            return
        grads *= grads.dtype.type(1.0 / scaler[LS.SCALE])
        self._fault_if_nonfinite(guard, G.OVERFLOW, grads)

    def update_scale(self, scaler, guard):
        if guard[G.FAULT] == G.OVERFLOW:
            guard[G.FAULT], guard[G.FAULT_STEP], guard[G.FAULT_INDEX] = G.NONE, 0, -1
            guard[G.STEP] += 1
            LS.update(scaler, overflow=True)
        elif guard[G.FAULT] == G.NONE:
            LS.update(scaler, overflow=False)

    def record_step(self, loss, loss_out, A, Y, guard):
        if guard[G.FAULT]:
            return
        n = A.shape[0]
        guard[G.LOSS_SUM] += float(loss_out[0]) * n
        guard[G.ROWS] += n
        guard[G.RING + (int(guard[G.STEP]) - 1) % G.RING_SIZE] = loss_out[0]
        accuracy = losses.accuracy(loss, A, Y)
        if accuracy is not None:
            guard[G.CORRECT] += accuracy * n
