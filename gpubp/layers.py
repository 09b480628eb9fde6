"""Dense: the one layer of an MLP. Forward and backward side by side, as the seed's equations.

    forward   Z = A_prev · Wᵀ + b        A = g(Z)
    backward  δ = dA ⊙ g'(Z)             dW = δᵀ · A_prev     db = Σₙ δₙ     dA_prev = δ · W
              (δ of the output layer comes fused from the loss; a hidden layer's δ is made by the layer above
              it, whose dA_prev GEMM applies the mask in its epilogue: Backend.input_grad_masked)

W (out, in) and b (out,) are views into the model's flat parameter buffer, dW and db views into its flat
gradient buffer; the network binds them (Sequential._bind) once the backend is known, with `precision`, the
model's GEMM precision (gpubp/precision.py; the backend ops round their operands to it). W16 (bf16/fp16 models):
W rounded to the precision's 16-bit storage, a view into the model's copy of the parameters that the network
refreshes at the start of every forward (Sequential._forward); the GEMMs read it in place of W, the same values
(round_p of a 16-bit value is exact). None: the ops round W themselves.
"""
import math
import numbers

from . import activations as acts


def _finite(value):
    try:
        return math.isfinite(value)
    except OverflowError:      # an int beyond float's range, 10**400
        return False


def _positive_int(value, what):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what}: expected a positive integer, got {value!r}")
    return int(value)


class Dense:
    def __init__(self, n_in, n_out, activation="identity", bias=True, alpha=acts.DEFAULT_ALPHA):
        self.n_in = _positive_int(n_in, "Dense n_in")
        self.n_out = _positive_int(n_out, "Dense n_out")
        self.activation = activation
        self.act = acts.activation_id(activation)
        if not isinstance(bias, bool):
            raise TypeError(f"Dense bias: expected True or False, got {bias!r}")
        self.bias = bias
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not _finite(alpha):
            raise ValueError(f"Dense alpha: expected a finite number, got {alpha!r}")
        self.alpha = float(alpha)
        self.W = self.b = self.dW = self.db = self.W16 = None
        self.precision = "fp32"

    def param_shapes(self):
        """[(name, shape)] in the order they sit in the flat buffers."""
        shapes = [("W", (self.n_out, self.n_in))]
        if self.bias:
            shapes.append(("b", (self.n_out,)))
        return shapes

    def init_params(self, rng):
        """PyTorch's nn.Linear default: W and b drawn from U(−1/√in, 1/√in)."""
        bound = 1.0 / math.sqrt(self.n_in)
        return {name: rng.uniform(-bound, bound, size=shape) for name, shape in self.param_shapes()}

    def forward(self, be, A_prev, Z, A):
        """Z = A_prev · Wᵀ + b,  A = g(Z)."""
        be.dense_forward(A_prev, self._W_operand(), self.b, self.act, self.alpha, Z, A, self.precision)

    def backward(self, be, A_prev, delta, prev=None, weight_grad_done=None):
        """From this layer's δ (already ⊙ g'(Z): the loss or the next layer applied it):
        dW = δᵀ · A_prev;  db = Σₙ δₙ;  and unless this is the first layer, the previous layer's
        δ_prev = (δ · W) ⊙ g_prev'(Z_prev), the mask fused into the GEMM that makes dA_prev.
        prev = (previous layer, its Z, its A, its δ buffer), or None for the first layer (nobody needs the
        gradient of the input). weight_grad_done(), when given, is called once dW and db are launched, before
        δ_prev: data-parallel training starts summing them across the ranks there (gpubp/distributed.py)."""
        be.weight_grad(delta, A_prev, self.dW, self.db, precision=self.precision)
        if weight_grad_done is not None:
            weight_grad_done()
        if prev is not None:
            prev_layer, Z_prev, A_prev_out, delta_prev = prev
            be.input_grad_masked(delta, self._W_operand(), Z_prev, A_prev_out, prev_layer.act, prev_layer.alpha,
                                 delta_prev, self.precision)

    def _W_operand(self):
        """W as the GEMMs take it: the 16-bit copy when the network keeps one, else the float32 master."""
        return self.W if self.W16 is None else self.W16

    def config(self):
        return {"n_in": self.n_in, "n_out": self.n_out, "activation": self.activation, "bias": self.bias,
                "alpha": self.alpha}

    def __repr__(self):
        return (f"Dense({self.n_in}, {self.n_out}, activation={self.activation!r}"
                + ("" if self.bias else ", bias=False") + ")")
