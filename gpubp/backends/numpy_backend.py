"""The numpy backend: the readable reference every other backend is tested against. Runs anywhere, float32
and float64. Each op writes into the buffers it is given (out=), so a train step allocates little."""
import numpy as np

from .. import activations as acts
from .. import losses
from .base import Backend


class NumpyBackend(Backend):
    name = "numpy"

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
        np.copyto(dst, src, casting="unsafe")

    def to_numpy(self, x):
        return np.array(x, copy=True)

    def view(self, flat, offset, shape):
        return flat[offset:offset + int(np.prod(shape))].reshape(shape)

    def all_finite(self, x):
        return bool(np.isfinite(x).all())

    def one_hot(self, labels, classes, out):
        out.fill(0)
        out[np.arange(out.shape[0]), np.asarray(labels)] = 1

    # ---- the kernel set ----------------------------------------------------------------------------------
    def dense_forward(self, A_prev, W, b, act, alpha, Z, A):
        np.matmul(A_prev, W.T, out=Z)      # Z = A_prev · Wᵀ
        if b is not None:
            Z += b                         #   + b  (broadcast over rows)
        if A is not Z:
            acts.forward(act, Z, alpha, out=A)

    def activation_mask(self, dA, Z, A, act, alpha, delta):
        acts.derivative_mask(act, dA, Z, A, alpha, out=delta)

    def weight_grad(self, delta, A_prev, dW, db, accumulate=False):
        if accumulate:
            dW += delta.T @ A_prev
            if db is not None:
                db += delta.sum(axis=0)
        else:
            np.matmul(delta.T, A_prev, out=dW)     # Σₙ δₙ aₙᵀ: the seed's outer products, summed
            if db is not None:
                np.sum(delta, axis=0, out=db)

    def input_grad(self, delta, W, dA_prev):
        np.matmul(delta, W, out=dA_prev)

    def loss_grad(self, loss, act, alpha, Z, y, A, delta, loss_out):
        loss_out[0] = losses.loss_grad(loss, act, alpha, Z, y, A, delta)

    def sgd_update(self, params, grads, momentum_buf, step, lr, momentum, dampening, weight_decay, nesterov):
        g = grads
        if weight_decay != 0:
            g = g + weight_decay * params
        if momentum != 0:
            if step[0] == 0:
                momentum_buf[...] = g
            else:
                momentum_buf *= momentum
                momentum_buf += (1 - dampening) * g
            g = g + momentum * momentum_buf if nesterov else momentum_buf
        params -= lr * g
        step[0] += 1

    def adam_update(self, params, grads, m, v, step, lr, beta1, beta2, eps, weight_decay):
        t = int(step[0]) + 1
        g = grads + weight_decay * params if weight_decay != 0 else grads
        m *= beta1
        m += (1 - beta1) * g
        v *= beta2
        v += (1 - beta2) * g * g
        step_size = lr / (1 - beta1 ** t)
        denom = np.sqrt(v) / np.sqrt(1 - beta2 ** t) + eps
        params -= step_size * (m / denom)
        step[0] = t
