"""The workloads: what is computed, at which sizes, its reference check, and its operation and byte counts.

    gemm    Z = A · Wᵀ, n×n×n, identity, no bias (our dense_forward) vs cuBLAS / torch.matmul; 2n³ flops
    dense   A_out = relu(A · Wᵀ + b) at the train shapes' first layers (one dense forward alone)
    train   one SGD step (momentum 0.9) of an MLP, ReLU hidden layers, identity output; SPEC section 5 shapes
    sweep   the 64-wide × 4-hidden train step (64-64-64-64-64-1, mse) over batch sizes, as samples/s
    fit     one epoch of the public Sequential.fit on NumPy data at the train shapes, as samples/s
    mixed   the train step in bf16 (gpubp precision="bf16" against torch.autocast(bfloat16)), SPEC section 5 shapes
    fused   issue 13: the fully fused MLP in bf16, w-w-w-w-w-1 (4 hidden layers of width w, tiny-cuda-nn's published
            configuration at w = 64), training samples/s (one train step) and inference samples/s (predict),
            batch 2^14 ... 2^21; gpubp fused and per-layer against torch.autocast(bfloat16), eager and CUDA graph

A case is (name, params); `make_sets` draws its input sets (float32, standard normal: never zeros) and
`reference` returns a function that checks a runner's result against numpy in float64 (timing.check).
"""
import math

import numpy as np

from . import timing

GEMM_TOL = 1e-4     # fp32 lands near 1e-6 here; TF32 near 3e-4: refused
TRAIN_TOL = 1e-3    # the first step's update against float64, norm-wise
# ... in a reduced precision: each implementation's own rounding (ours: gpubp/backends/base.py's contract; torch:
# autocast's; JAX: bf16 operands) against the same float64 reference.
# The forward (predict): a few units of the format's relative error u (bf16: 2^-8; tf32 and fp16: 2^-11).
PREDICT_TOL_PRECISION = {"fp32": TRAIN_TOL, "tf32": 1e-2, "bf16": 5e-2, "fp16": 2e-2}
# The training step's update: more, as √u. NOTE: ReLU's derivative is a step: a unit whose input changes sign
# under the rounding passes all of its delta or none of it where float64 does the opposite; a fraction ~u of the
# units flip (bf16 at 784-256-256-10: 0.08% of the first layer's), so the update's norm-wise error grows as √u.
# Measured on the CPU over 5 draws at 784-256-256-10 b256 softmax_ce, gpubp and torch autocast alike: bf16 0.043
# to 0.052 (0.034 at 784-1024-1024-10 b1024, JAX too), tf32 and fp16 0.013 to 0.017 (gpubp); the tolerance is
# about twice that, so a correct bf16 row is not refused for its draw of data.
TRAIN_TOL_PRECISION = {"fp32": TRAIN_TOL, "tf32": 4e-2, "bf16": 1e-1, "fp16": 4e-2}
VALIDATE_LR = 0.1   # a large first step, so the float32 update is far above the parameters' rounding
TIMING_LR = 0.01    # what the timed runs train with (many steps on random data must stay finite)
CHECK_ROWS = 256    # rows of a big product compared with the float64 reference (every row when fewer)


class MLP:
    """An MLP shape: dims [in, hidden..., out], batch N, loss, GEMM precision (gpubp/precision.py). ReLU hidden
    layers, identity output."""

    def __init__(self, dims, batch, loss, precision="fp32"):
        self.dims, self.batch, self.loss, self.precision = list(dims), int(batch), loss, precision

    @property
    def name(self):
        return "-".join(map(str, self.dims)) + f" b{self.batch}" + ("" if self.precision == "fp32" else
                                                                      f" {self.precision}")

    def pairs(self):
        return list(zip(self.dims[:-1], self.dims[1:]))

    def flops(self):
        """Forward 2·N·in·out per layer; backward dW 2·N·in·out per layer and dA 2·N·in·out for all but the first
        (nobody needs the input's gradient). Element-wise work is left out."""
        per_layer = [2 * self.batch * i * o for i, o in self.pairs()]
        return 3 * sum(per_layer) - per_layer[0]

    def min_bytes(self):
        """An optimistic floor of float32 traffic: X and Y read once, each hidden activation written once and
        read once by backward, parameters, gradients and momentum each read and written once."""
        P = sum(i * o + o for i, o in self.pairs())
        hidden = sum(self.dims[1:-1])
        act_bytes = 2 if self.precision in ("bf16", "fp16") else 4     # hidden activations stored 16-bit
        return (4 * (self.batch * (self.dims[0] + self.dims[-1]) + 6 * P)
                + act_bytes * 2 * self.batch * hidden)

    def params(self):
        return {"dims": self.dims, "batch": self.batch, "loss": self.loss, "optimizer": "SGD momentum 0.9",
                "dtype": "float32", "precision": self.precision}


class FusedMLP(MLP):
    """An MLP of the fused workload: bf16, `kind` "train" (one SGD step, as MLP) or "predict" (inference: the
    forward alone, Sequential.predict). dims [w, w, w, w, w, 1]: input w, 4 hidden layers of width w, 1 output."""

    init = "kaiming"     # initial_params: weights that keep the activations' scale (the output depends on X)

    def __init__(self, dims, batch, kind, loss="mse"):
        super().__init__(dims, batch, loss, "bf16")
        self.kind = kind

    @property
    def name(self):
        """w<width>x4 b<batch> bf16 <kind>: short enough for the table's case column (dims are in params)."""
        hidden = len(self.dims) - 2
        return f"w{self.width}x{hidden} b{self.batch} {self.precision} {self.kind}"

    @property
    def width(self):
        return self.dims[1]

    def flops(self):
        if self.kind == "train":
            return super().flops()
        return sum(2 * self.batch * i * o for i, o in self.pairs())

    def min_bytes(self):
        if self.kind == "train":
            return super().min_bytes()
        # X read once, the output written once, the parameters read once (float32); nothing else leaves the chip
        return 4 * (self.batch * (self.dims[0] + self.dims[-1]) + sum(i * o + o for i, o in self.pairs()))

    def params(self):
        p = dict(super().params(), kind=self.kind, width=self.width)
        if self.kind == "predict":
            del p["optimizer"]
        return p


class FitSpec(MLP):
    """An epoch of `samples` rows of an MLP trained by fit in batches of `batch`."""

    def __init__(self, dims, batch, loss, samples):
        super().__init__(dims, batch, loss)
        self.samples = int(samples)

    @property
    def name(self):
        return super().name + f" x{self.samples}"

    @property
    def batches(self):
        return -(-self.samples // self.batch)

    def flops(self):
        return super().flops() * self.samples // self.batch

    def min_bytes(self):
        return super().min_bytes() * self.batches

    def params(self):
        return dict(super().params(), samples=self.samples, epochs=1, shuffle=True)


def n_sets_for(set_bytes):
    """Input sets to cycle: enough to hold 128 MiB (more than any L2 and most L3 caches), 2 to 8."""
    return int(min(8, max(2, math.ceil(128 * 2**20 / max(set_bytes, 1)))))


# ---- the cases, per device ------------------------------------------------------------------------------------------
def gemm_cases(device, quick, smoke=False):
    if smoke:
        sizes = [64]
    elif device == "cuda":
        sizes = [1024, 4096] if quick else [1024, 2048, 4096, 8192]
    else:
        sizes = [256, 1024] if quick else [512, 1024, 2048]
    return [(f"n{n}", {"n": n}) for n in sizes]


def dense_cases(device, quick, smoke=False):
    if smoke:
        shapes = [(32, 16, 8)]
    elif device == "cuda":
        shapes = [(1024, 784, 1024), (65536, 64, 64)]
    else:
        shapes = [(256, 784, 256), (4096, 64, 64)]
    return [(f"{N}x{i}->{o}", {"N": N, "in": i, "out": o}) for N, i, o in shapes]


def train_cases(device, quick, smoke=False):
    if smoke:
        mlps = [MLP([12, 16, 16, 3], 32, "softmax_ce"), MLP([8] * 5 + [1], 64, "mse")]
    elif device == "cuda":
        mlps = [MLP([784, 1024, 1024, 10], 1024, "softmax_ce"), MLP([64] * 5 + [1], 65536, "mse")]
    else:    # issue 2's CPU shapes
        mlps = [MLP([784, 256, 256, 10], 256, "softmax_ce"), MLP([64] * 5 + [1], 4096, "mse"),
                MLP([1024, 1024, 1024, 10], 512, "softmax_ce")]
    return [(m.name, m) for m in mlps]


def mixed_cases(device, quick, smoke=False):
    """The train shapes in bf16 (issue 12's bar: faster than PyTorch autocast eager at 784-1024-1024-10 b1024)."""
    if smoke:
        mlps = [MLP([12, 16, 16, 3], 32, "softmax_ce", "bf16")]
    elif device == "cuda":
        mlps = [MLP([784, 1024, 1024, 10], 1024, "softmax_ce", "bf16"), MLP([64] * 5 + [1], 65536, "mse", "bf16")]
    else:
        mlps = [MLP([784, 256, 256, 10], 256, "softmax_ce", "bf16")]
    return [(m.name, m) for m in mlps]


def sweep_cases(device, quick, smoke=False):
    if smoke:
        exps = [4, 6]
    elif device == "cuda":
        exps = range(8, 21, 4) if quick else range(8, 21)
    else:
        exps = range(8, 15, 2) if quick else range(8, 17)
    return [(f"b{2**e}", MLP([64] * 5 + [1], 2**e, "mse")) for e in exps]


FUSED_WIDTH = 64                 # tiny-cuda-nn's published configuration: width 64, 4 hidden layers
FUSED_OTHER_WIDTHS = (32, 100, 128)   # at one batch, FUSED_OTHER_BATCH; 100 runs zero-padded on the H = 128
                                     # kernel (gpubp/fused.py): beside w128 it shows what the padding costs
FUSED_OTHER_BATCH = 2**18
FUSED_BAR_BATCH = 2**21          # the moonshot's row (bench/suite.py SPEC_BARS): the largest batch, in --quick too


def fused_dims(width):
    return [width] * 5 + [1]


def fused_cases(device, quick, smoke=False):
    """Issue 13's fully fused MLP in bf16. On the GPU: width 64 over batch 2^14 ... 2^21, training and inference,
    and widths 32, 100 (padded to 128) and 128 at one batch; --quick a subset holding the moonshot's row. On the CPU, tiny sizes only
    (the numpy backend's fused path is the reference, not a fast path: its rows check the harness, nothing more)."""
    if device == "cuda" and not smoke:
        exps = (14, 17, 21) if quick else range(14, 22)
        specs = [FusedMLP(fused_dims(FUSED_WIDTH), 2**e, "train") for e in exps]
        specs += [FusedMLP(fused_dims(FUSED_WIDTH), 2**e, "predict") for e in ((21,) if quick else exps)]
        specs += [FusedMLP(fused_dims(w), FUSED_OTHER_BATCH, kind) for w in FUSED_OTHER_WIDTHS
                  for kind in ("train", "predict")]
    else:      # the CPU, or --smoke: width 16 (the smallest kernel instance), two batches for the plot's line
        specs = [FusedMLP(fused_dims(16), b, kind) for kind in ("train", "predict") for b in (64, 128)]
    return [(s.name, s) for s in specs]


def fit_cases(device, quick, smoke=False):
    """The train shapes, each over an epoch of a few dozen batches (fewer for the large-batch one)."""
    if smoke:
        specs = [FitSpec([12, 16, 16, 3], 32, "softmax_ce", 128)]
    elif device == "cuda":
        specs = [FitSpec([784, 1024, 1024, 10], 1024, "softmax_ce", 32 * 1024),
                 FitSpec([64] * 5 + [1], 65536, "mse", 16 * 65536)]
    else:
        specs = [FitSpec([784, 256, 256, 10], 256, "softmax_ce", 32 * 256),
                 FitSpec([64] * 5 + [1], 4096, "mse", 16 * 4096)]
    return [(s.name, s) for s in specs]


FIT_CHECK_BATCHES = 3   # fit's check: an epoch of this many batches from θ0, against the numpy backend in float64


# ---- inputs and references ---------------------------------------------------------------------------------------
def _normal(rng, shape):
    return rng.standard_normal(shape, dtype=np.float32)


def gemm_sets(params, rng):
    n = params["n"]
    k = n_sets_for(2 * 4 * n * n)
    return [(_normal(rng, (n, n)), _normal(rng, (n, n))) for _ in range(k)]


def dense_sets(params, rng):
    N, i, o = params["N"], params["in"], params["out"]
    k = n_sets_for(4 * (N * i + o * i + o))
    return [(_normal(rng, (N, i)), _normal(rng, (o, i)) / np.float32(math.sqrt(i)), _normal(rng, (o,)))
            for _ in range(k)]


def train_sets(mlp, rng):
    N, n_in, n_out = mlp.batch, mlp.dims[0], mlp.dims[-1]
    k = n_sets_for(4 * N * (n_in + n_out))
    sets = []
    for _ in range(k):
        X = _normal(rng, (N, n_in))
        if mlp.loss == "softmax_ce":
            Y = np.eye(n_out, dtype=np.float32)[rng.integers(0, n_out, N)]   # one-hot float targets
        else:
            Y = _normal(rng, (N, n_out))
        sets.append((X, Y))
    return sets


def predict_reference(mlp, params0, sets, rng):
    """A check of a runner that last predicted set 0 (check_calls("predict"): set 1, then set 0): sampled rows of
    its output against the float64 forward of params0 (ReLU hidden layers, identity output), within the
    precision's tolerance (PREDICT_TOL_PRECISION); the whole output must be finite.

    NOTE: the error is measured against the output's variation over the rows, ‖got − ref‖ / ‖ref − mean(ref)‖,
    not against ‖ref‖, so that an output that hardly depends on the input (mostly biases) cannot let the output
    of the wrong input set pass (with nn.Linear's init at width 16 a plain relative error gave it 0.10); with the
    fused workload's kaiming init (initial_params) the two measures are close."""
    X = sets[0][0]
    rows = _rows(X.shape[0], rng)
    A = X[rows].astype(np.float64)
    for k, p in enumerate(params0):
        A = A @ np.asarray(p["W"], np.float64).T + np.asarray(p["b"], np.float64)
        if k < len(params0) - 1:
            A = np.maximum(A, 0)

    def check(result, what):
        result = np.asarray(result)
        if result.shape != (X.shape[0], A.shape[1]) or not np.isfinite(result).all():
            raise timing.Refused(f"{what}: result has NaN or inf, or shape {result.shape} (an element left "
                                 "unwritten, or an overflow)")
        mean = A.mean(axis=0)
        return timing.check(result[rows] - mean, A - mean, PREDICT_TOL_PRECISION[mlp.precision], what)
    return check


def fit_data(spec, rng):
    """One data set of spec.samples rows (a fit epoch cycles through more than any cache by itself)."""
    N, n_in, n_out = spec.samples, spec.dims[0], spec.dims[-1]
    X = _normal(rng, (N, n_in))
    if spec.loss == "softmax_ce":
        return X, np.eye(n_out, dtype=np.float32)[rng.integers(0, n_out, N)]
    return X, _normal(rng, (N, n_out))


def fit_check_data(spec, data):
    n = min(spec.samples, FIT_CHECK_BATCHES * spec.batch)
    return data[0][:n], data[1][:n]


def fit_reference(spec, params0, data):
    """A check of the parameters after one fit epoch over fit_check_data (learning rate VALIDATE_LR): the change
    θ − θ0 against the numpy backend's in float64, same θ0, same seed (so the same shuffle), same batches."""
    from .impls import gpubp_net
    net, opt = gpubp_net(spec, params0, VALIDATE_LR, backend="numpy", dtype="float64")
    X, Y = fit_check_data(spec, data)
    net.fit(X.astype(np.float64), Y.astype(np.float64), loss=spec.loss, optimizer=opt, epochs=1,
            batch_size=spec.batch, shuffle=True)
    p0 = _flat(params0)
    ref_change = _flat(net.get_params()) - p0

    def check(result, what):
        return timing.check(_flat(result) - p0, ref_change, TRAIN_TOL, what)
    return check


def initial_params(mlp, rng):
    """nn.Linear's default init U(−1/√in, 1/√in), as float32 values (every implementation starts equal); for an
    MLP with init "kaiming" (the fused workload) W ~ U(−√(6/in), √(6/in)), torch's kaiming_uniform_ for ReLU,
    which keeps the activations' scale through the layers, so the output depends on the input (with nn.Linear's
    init a 4-hidden-layer MLP's output is mostly its biases, the same for every row), the biases as nn.Linear's."""
    out = []
    for i, o in mlp.pairs():
        bound = 1.0 / math.sqrt(i)
        w_bound = math.sqrt(6.0 / i) if getattr(mlp, "init", "linear") == "kaiming" else bound
        out.append({"W": rng.uniform(-w_bound, w_bound, (o, i)).astype(np.float32),
                    "b": rng.uniform(-bound, bound, (o,)).astype(np.float32)})
    return out


def _rows(n, rng):
    return np.arange(n) if n <= CHECK_ROWS else np.sort(rng.choice(n, CHECK_ROWS, replace=False))


def gemm_reference(sets, rng):
    """A check of a runner that last computed Z = A·Wᵀ on set 0: sampled rows against float64; the whole
    output must be finite (it was poisoned with NaN)."""
    A, W = sets[0]
    rows = _rows(A.shape[0], rng)
    ref = A[rows].astype(np.float64) @ W.T.astype(np.float64)

    def check(result, what):
        if not np.isfinite(result).all():
            raise timing.Refused(f"{what}: result has NaN or inf (an element left unwritten, or an overflow)")
        return timing.check(result[rows], ref, GEMM_TOL, what)
    return check


def dense_reference(sets, rng):
    A, W, b = sets[0]
    rows = _rows(A.shape[0], rng)
    ref = np.maximum(A[rows].astype(np.float64) @ W.T.astype(np.float64) + b, 0)

    def check(result, what):
        if not np.isfinite(result).all():
            raise timing.Refused(f"{what}: result has NaN or inf (an element left unwritten, or an overflow)")
        return timing.check(result[rows], ref, GEMM_TOL, what)
    return check


def _flat(params):
    return np.concatenate([np.concatenate([np.ravel(p["W"]), np.ravel(p["b"])]) for p in params]).astype(np.float64)


def check_calls(kind, n_sets):
    """The input sets a runner works on, in order, before its result is checked. More than one call, on
    different sets: an implementation that keeps reading the first call's inputs (a CUDA graph replayed on
    stale buffers, a cached result) gives a wrong answer and is refused. Train: three steps (a graph-capturing
    backend runs eagerly, captures, then replays); gemm and dense: set 1, then set 0, which is checked."""
    if kind == "fit":
        return [0]      # one epoch; its batches differ from one another already
    return [0, 1 % n_sets, 2 % n_sets] if kind == "train" else [1 % n_sets, 0]


def train_reference(mlp, params0, sets):
    """A check of the parameters after the steps of check_calls (learning rate VALIDATE_LR): the change
    θ − θ0 against the numpy backend's in float64, from the same θ0 on the same batches."""
    from .impls import gpubp_net
    net, opt = gpubp_net(mlp, params0, VALIDATE_LR, backend="numpy", dtype="float64")
    for i in check_calls("train", len(sets)):
        X, Y = sets[i]
        net.train_step(X.astype(np.float64), Y.astype(np.float64), loss=mlp.loss, optimizer=opt)
    p0 = _flat(params0)
    ref_change = _flat(net.get_params()) - p0

    def check(result, what):
        return timing.check(_flat(result) - p0, ref_change, TRAIN_TOL_PRECISION[mlp.precision], what)
    return check
