"""Sequential: the model. Public methods validate everything first, then delegate to the backend ops through
the layers, the loss and the optimizer, so a failed call leaves the model exactly as it was.

A train step, in the seed's order:
    forward    for each layer: Z = A_prev · Wᵀ + b, A = g(Z)
    loss       L and δ_out = ∂L/∂Z_out, fused with the output activation (gpubp.losses)
    backward   for each layer, last to first: dW = δᵀ · A_prev; db = Σ δ; δ_prev = (δ · W) ⊙ g'(Z_prev)
    guard      L and every gradient finite, else the device-side guard records the fault and the step is skipped
    update     θ ← θ − η · (optimizer's direction), in place over the flat parameter buffer, unless it would
               leave a value non-finite (then nothing is written and the guard records that instead)
    record     the step's loss and correct predictions summed on the device

Nothing in a step waits for the host (gpubp/guard.py): the host reads the guard when it wants a value, once per
train_step by default, once per epoch (or per `check_every` steps) in fit, and raises FloatingPointError then.
"""
import functools
import numbers
import warnings
from collections import OrderedDict

import numpy as np

from . import activations as acts
from . import distributed
from . import fused as F
from . import guard as G
from . import labels as L
from . import loss_scale as LS
from . import losses
from . import precision as P
from .backends import get_backend
from .layers import Dense
from .params import FlatLayout

DTYPES = ("float32", "float64")
_MAX_WORKSPACES = 4   # batch sizes kept allocated: fit's full and last batch, validation, predict


def _dtype_name(dtype):
    """'float32' for "float32", np.float32 or np.dtype('float32'); None for anything that is not a dtype."""
    if not isinstance(dtype, (str, type, np.dtype)):
        return None
    try:
        return np.dtype(dtype).name
    except TypeError:
        return None


class NotOnThisBackend(ValueError):
    """A setting the chosen backend does not implement (a precision, the fused path): the model is fine, the
    backend is not the one for it. A ValueError, so callers that catch bad settings catch it too."""


class Workspace:
    """Every buffer a step at batch size N touches, allocated once: then a step allocates nothing.
    Per layer: Z and A (N, out), and G (N, out), which holds the layer's δ = dA ⊙ g'(Z). Hidden layers' A and
    every δ are in `storage`, the GEMM precision's storage type (16-bit for bf16/fp16, base.py); Z, the output
    layer's A (the prediction), X and Y in the model's dtype.
    fused (the fused MLP, gpubp/fused.py): the hidden layers' A and δ live in one (L, N, H) block each, `hidden`
    and `deltas`, as the fused kernels take them (H = fused.kernel_width; a narrower layer fills its first
    columns). A layer H wide shares them with the per-layer path (its A and G are those blocks' views); a
    narrower one keeps arrays of its own there, as the per-layer ops need contiguous (N, out) arrays."""

    def __init__(self, be, layers, N, dtype, storage, fused=False):
        last = len(layers) - 1
        self.X = be.empty((N, layers[0].n_in), dtype)
        self.Y = be.empty((N, layers[-1].n_out), dtype)
        self.Z = [be.empty((N, layer.n_out), dtype) for layer in layers]
        self.A = [be.empty((N, layer.n_out), dtype if i == last else storage) for i, layer in enumerate(layers)]
        self.G = [be.empty((N, layer.n_out), storage) for layer in layers]
        self.hidden = self.deltas = None
        if fused:
            H = F.kernel_width(layer.n_out for layer in layers[:last])
            self.hidden, self.deltas = be.empty((last, N, H), storage), be.empty((last, N, H), storage)
            for l in range(last):
                if layers[l].n_out == H:
                    self.A[l], self.G[l] = self.hidden[l], self.deltas[l]
        self.loss = be.zeros((1,), dtype)


# fit keeps its data on the device while X and Y take at most this share of the device's free memory; above it
# the data stays on the host and goes up in chunks (DeviceData).
DEVICE_DATA_SHARE = 0.5


class DeviceData:
    """fit's data on the device, and the step closures that train on it.

    Resident (the usual case): X and the float targets Y are uploaded once, integer labels one-hot encoded on the
    device; an order buffer (N + 1,) int64 holds the epoch's permutation and, in its last entry, the cursor of
    the next batch (one upload per epoch for both), and each step gathers its rows on the device.
    Streamed (X and Y above DEVICE_DATA_SHARE of the free device memory): they stay on the host; each epoch goes
    up in chunks of whole batches, the rows of a chunk gathered on the host in the epoch's order, into two
    device chunk buffers used in turn (the host gathers chunk c + 1 while the device trains on chunk c).
    Backend.upload_chunk copies a chunk once the steps that read its buffers before are done (release_chunk
    marks when the last of them is launched): in stream order on numpy and numba; on cupy from pinned host
    buffers on a copy stream, the compute stream waiting for the copy. Host-to-device copies then grow with the
    data, never the reads."""

    class Buffers:
        def __init__(self, X, Y, order):
            self.X, self.Y, self.order = X, Y, order

    def __init__(self, net, X, y, loss_id, batch_size, optimizer, data_parallel=None):
        be = net.backend
        self.net, self.loss_id, self.batch_size, self.optimizer = net, loss_id, batch_size, optimizer
        # fit(comm=...): this rank's share of each global batch of batch_size × ranks rows (gpubp/distributed.py)
        self.data_parallel = data_parallel
        self.n_batches = -(-X.shape[0] // (batch_size * (1 if data_parallel is None else data_parallel.comm.size)))
        self.rows = N = X.shape[0]
        labels = loss_id == losses.SOFTMAX_CE and y.ndim == 1
        row_bytes = (net.n_in + net.n_out) * net.dtype.itemsize
        free = be.free_memory()
        budget = None if free is None else DEVICE_DATA_SHARE * free
        if budget is None or be.is_device_array(X) or N * row_bytes <= budget:
            self.chunk_rows = N
            X = be.asarray(X, net.dtype)        # no copy when X already is a device array of the model's dtype
            if labels:
                Y = be.empty((N, net.n_out), net.dtype)
                be.one_hot(y, net.n_out, Y)
            else:
                Y = be.asarray(y, net.dtype)
            self.buffers = [self.Buffers(X, Y, be.empty((N + 1,), np.int64))]
        else:
            # two chunks in the budget, each a whole number of batches
            self.chunk_rows = max(1, int(budget // (2 * row_bytes)) // batch_size) * batch_size
            self.host_X = np.ascontiguousarray(X, dtype=net.dtype)
            y = np.asarray(y)
            self.host_Y = (np.eye(net.n_out, dtype=net.dtype)[y] if labels
                           else np.ascontiguousarray(y.reshape(N, net.n_out), dtype=net.dtype))
            self.buffers = [self.Buffers(be.empty((self.chunk_rows, net.n_in), net.dtype),
                                         be.empty((self.chunk_rows, net.n_out), net.dtype),
                                         be.empty((self.chunk_rows + 1,), np.int64)) for _ in range(2)]
        self._closures = {}

    @property
    def streamed(self):
        return self.chunk_rows < self.rows

    def batches(self, permutation, steps_per_graph=1, read_after=lambda done: False):
        """(steps, step key, step closure) for every batch of an epoch in `permutation`'s order, one step each,
        or with steps_per_graph k > 1 up to k consecutive full batches of a chunk as one closure (one key, so one
        captured graph replays them all), a group ending where read_after(batches done) says the host reads;
        uploads the order (or, streamed, each chunk) as it goes. With data_parallel (never grouped): this rank's
        rows of each global batch, and a last step of 0 rows when the last global batch has none for this rank
        (gpubp/distributed.py)."""
        be = self.net.backend
        global_rows, s = None, 0
        if self.data_parallel is not None:
            permutation, global_rows = self.data_parallel.share(permutation, self.batch_size)
        for c, start in enumerate(range(0, len(permutation), self.chunk_rows)):
            rows = permutation[start:start + self.chunk_rows]
            k = c % len(self.buffers)
            buffers = self.buffers[k]
            order = np.zeros(buffers.order.shape[0], np.int64)   # the order, then (last entry) the cursor, 0
            if self.streamed:   # the chunk's rows gathered on the host, in order; the device reads them in turn
                order[:len(rows)] = np.arange(len(rows))
                be.upload_chunk(k, [(buffers.X, self.host_X, rows), (buffers.Y, self.host_Y, rows),
                                    (buffers.order, order, None)])
            else:
                order[:len(rows)] = rows
                be.copy_into(buffers.order, order)
            group = 0
            for b in range(0, len(rows), self.batch_size):
                n = min(self.batch_size, len(rows) - b)
                g = None if global_rows is None else global_rows[s]
                s += 1
                key = ("fit", n, g, k, self.loss_id, self.optimizer.key())
                if steps_per_graph == 1 or n < self.batch_size:
                    yield 1, key, self._closure(k, n, g)
                    continue
                group += 1
                last_full = b + 2 * self.batch_size > len(rows)   # the next batch is short, or there is none
                if group == steps_per_graph or last_full or read_after(s):
                    yield group, key + (group,) if group > 1 else key, self._group_closure(k, n, group)
                    group = 0
            if self.streamed:   # (resumed: the caller has launched every step of the chunk)
                be.release_chunk(k)
        if global_rows is not None and s < len(global_rows):
            g = global_rows[s]
            yield 1, ("fit", 0, g, None, self.loss_id, self.optimizer.key()), self._closure(None, 0, g)

    def _group_closure(self, k, n, steps):
        """`steps` consecutive steps of _closure(k, n) as one closure, made once (so a backend may replay it as
        one captured graph)."""
        if steps == 1:
            return self._closure(k, n)
        if (k, n, "steps", steps) not in self._closures:
            step = self._closure(k, n)

            def group():
                for _ in range(steps):
                    step()
            self._closures[(k, n, "steps", steps)] = group
        return self._closures[(k, n, "steps", steps)]

    def _closure(self, k, n, n_global=None):
        """The launches of one step on the next n rows of buffers k: gather X and Y, move the cursor, then the
        step. Made once per (buffers, batch size, global batch size): it holds the same objects at every call,
        so a backend may replay it as a captured graph."""
        if (k, n, n_global) not in self._closures:
            net, be, optimizer, loss_id = self.net, self.net.backend, self.optimizer, self.loss_id
            ws = None if n == 0 else net._workspace(n)
            reduction = (None if n_global is None else
                         self.data_parallel.gradient_reduction(n, n_global, None if ws is None else ws.loss))
            if n == 0:
                self._closures[(k, n, n_global)] = lambda: net._step_ops(None, None, loss_id, optimizer, None,
                                                                         reduction)
                return self._closures[(k, n, n_global)]
            b = self.buffers[k]
            X, Y, order = b.X, b.Y, b.order
            cursor = be.view(order, order.shape[0] - 1, (1,))

            def step():
                be.gather_rows(X, order, cursor, ws.X)
                be.gather_rows(Y, order, cursor, ws.Y)
                be.advance_cursor(cursor, n)
                net._step_ops(ws.X, ws.Y, loss_id, optimizer, ws, reduction)
            self._closures[(k, n, n_global)] = step
        return self._closures[(k, n, n_global)]


class ValidationData:
    """fit's validation set on the device, uploaded once per fit (integer labels one-hot encoded there), so that
    each epoch's evaluation launches forward, the fused loss and record_step on it and reads the device once
    (Sequential._evaluate_staged)."""

    def __init__(self, net, X, y, loss_id):
        be = net.backend
        self.X = be.asarray(X, net.dtype)   # no copy when X already is a device array of the model's dtype
        if loss_id == losses.SOFTMAX_CE and y.ndim == 1:
            self.Y = be.empty((X.shape[0], net.n_out), net.dtype)
            be.one_hot(y, net.n_out, self.Y)
        else:
            self.Y = be.asarray(y, net.dtype)


class LazyLoss:
    """The loss of a train_step(sync=False): the device has it; float() waits for the device, reads it, and
    raises FloatingPointError if a step launched so far faulted (Sequential.sync)."""

    def __init__(self, net, step):
        self.net, self.step = net, step

    def __float__(self):
        return self.net._loss_of_step(self.step)

    def __repr__(self):
        return f"LazyLoss(train step {self.step})"


class History(dict):
    """Per-epoch metrics, Keras-style: history["loss"], history["val_loss"], history["accuracy"], ... (fit makes
    every key it will fill, so they exist, as empty lists, even when no epoch finished). `epoch`: the 0-based
    indices of the epochs recorded. `stop_reason` is None unless fit stopped early: a non-finite step (then
    `fault` is the FloatingPointError), a callback (EarlyStopping, model.stop_training) or an exception."""

    stop_reason = None
    fault = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch = []
    overflow_steps = 0   # fp16: steps the loss scaler skipped for overflow (gpubp/loss_scale.py)

    @property
    def history(self):
        return self


class Sequential:
    def __init__(self, *layers, backend="auto", dtype="float32", seed=0, deterministic=False, precision=None,
                 fused="auto"):
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        if not layers:
            raise ValueError("Sequential: expected at least one Dense layer, got none")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Dense):
                raise TypeError(f"Sequential layer {i}: expected a gpubp.Dense, got {type(layer).__name__}")
        for i in range(1, len(layers)):
            if layers[i].n_in != layers[i - 1].n_out:
                raise ValueError(f"Sequential layer {i}: expects {layers[i].n_in} inputs but layer {i - 1} "
                                 f"gives {layers[i - 1].n_out} outputs")
        if len(set(map(id, layers))) != len(layers):
            raise ValueError("Sequential: the same Dense object appears twice; make one per position")
        if _dtype_name(dtype) not in DTYPES:
            raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {dtype!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
        if not isinstance(deterministic, bool):
            raise TypeError(f"deterministic: expected True or False, got {deterministic!r}")
        if not (fused is True or fused is False or (isinstance(fused, str) and fused == "auto")):
            raise ValueError(f"fused: expected 'auto', True or False, got {fused!r}")
        # None for float64 models (they multiply in float64); the GEMM ops take "fp32" for those
        self.precision = P.check_precision(precision, _dtype_name(dtype))
        fusable, why_not = F.qualifies(layers, self.precision)
        if fused is True and not fusable:
            raise ValueError(f"fused=True: this model cannot take the fused MLP path: {why_not}")
        self.layers = list(layers)
        self.dtype = np.dtype(dtype)
        self.seed = int(seed)
        self.deterministic = deterministic
        self.backend = get_backend(backend, deterministic=deterministic)
        if self.precision is not None and self.precision not in self.backend.PRECISIONS:
            raise NotOnThisBackend(f"precision={self.precision!r} is not implemented on backend "
                             f"{self.backend.name!r}; it has {list(self.backend.PRECISIONS)}")
        if fused is True and not self.backend.FUSED:
            raise NotOnThisBackend(f"fused=True: backend {self.backend.name!r} has no fused MLP path (the numpy and cupy "
                             f"backends have one); use fused='auto' or False")
        # The fused MLP (gpubp/fused.py) runs forward and backward when the backend has it and the model qualifies;
        # fused_setting is what was asked ("auto", True, False), fused which path runs.
        self.fused_setting = fused
        self.fused = bool(fused is not False and fusable and self.backend.FUSED)
        self.rng = np.random.default_rng(self.seed)   # initialisation, then fit's shuffling
        self.layout = FlatLayout(self.layers)
        self.params = self.backend.empty((self.layout.size,), self.dtype)
        # The gradients, then one slot for the loss: what a data-parallel step sums across the ranks in one call
        # (gpubp/distributed.py).
        self.reduce_buffer = self.backend.zeros((self.layout.size + 1,), self.dtype)
        self.grads = self.backend.view(self.reduce_buffer, 0, (self.layout.size,))
        # bf16/fp16: the parameters rounded to the 16-bit storage, in the flat buffer's layout; each layer's W16 is
        # its view. _forward refreshes it first (one round_to_storage over all of it), and the step's GEMMs read
        # it: one rounding of the weights per forward, shared by forward and backward, instead of one per GEMM.
        # NOTE: only the float32 master is ever written (optimizer steps, set_params, checkpoints, EarlyStopping's
        # restore, distributed broadcasts); the copy is rebuilt at the start of every forward, so it cannot go
        # stale. Made here, once, so a captured step allocates nothing. FlatLayout starts every W at a multiple of
        # ALIGN (32) elements, so a W16 view is aligned as the per-GEMM scratch was: its rows are 16-byte aligned
        # (the tensor-core GEMM's cp.async path) exactly when n_in % 8 == 0, as before; no layer needs scratch.
        self.params16 = None
        if self.precision in ("bf16", "fp16"):
            self.params16 = self.backend.zeros((self.layout.size,), self.backend.storage_dtype(self.precision))
        self._bind()
        self.backend.copy_into(self.params, self.layout.flatten(
            [layer.init_params(self.rng) for layer in self.layers], self.dtype))
        self.optimizer = None     # the optimizer made for this model last; saved with it
        self._workspaces = OrderedDict()
        # The device-side guard (gpubp/guard.py). _steps: good steps as of the last read of it; _pending: steps
        # launched since then (their outcome is on the device until the next read).
        self.guard = self.backend.zeros((G.SIZE,), np.float64)
        self._guard_head = self.backend.view(self.guard, 0, (G.RING,))
        self.steps = 0
        # fp16 only: the device loss scaler (gpubp/loss_scale.py); _scale is its SCALE entry, read by loss_grad
        self.scaler = self._scale = None
        if self.precision == "fp16":
            self.scaler = self.backend.empty((LS.SIZE,), np.float64)
            self.backend.copy_into(self.scaler, LS.fresh())
            self._scale = self.backend.view(self.scaler, LS.SCALE, (1,))

    def _bind(self):
        for layer, p, g in zip(self.layers, self.layout.views(self.backend, self.params),
                               self.layout.views(self.backend, self.grads)):
            layer.W, layer.b, layer.dW, layer.db = p["W"], p.get("b"), g["W"], g.get("b")
            layer.precision = self._gemm_precision
        for layer, w16 in zip(self.layers, [None] * len(self.layers) if self.params16 is None
                              else self.layout.views(self.backend, self.params16)):
            layer.W16 = None if w16 is None else w16["W"]

    @property
    def _gemm_precision(self):
        """What the GEMM ops take: the model's precision, or "fp32" (the model dtype's own arithmetic) for a
        float64 model."""
        return self.precision or "fp32"

    @property
    def loss_scale(self):
        """The fp16 loss scaler's current scale and the steps it skipped for overflow, (scale, overflows), read
        from the device (one read); None for other precisions."""
        if self.scaler is None:
            return None
        scaler = self.backend.to_numpy(self.scaler)
        return float(scaler[LS.SCALE]), int(scaler[LS.OVERFLOWS])

    @property
    def n_in(self):
        return self.layers[0].n_in

    @property
    def n_out(self):
        return self.layers[-1].n_out

    def __repr__(self):
        inner = ", ".join(map(repr, self.layers))
        precision = "" if self.precision in (None, P.DEFAULT_PRECISION) else f", precision={self.precision!r}"
        fused = "" if self.fused_setting == "auto" else f", fused={self.fused_setting!r}"
        return (f"Sequential({inner}, backend={self.backend.name!r}, dtype={self.dtype.name!r}{precision}{fused}, "
                f"seed={self.seed})")

    # ---- validation: everything is checked before anything is touched -------------------------------------
    def _check_array(self, x, what, trailing, on_device=False):
        """`x` as a numpy array or a device array of our backend, numeric, finite, of shape (N, *trailing).
        on_device=True (a sync=False step): the values of a device array are not read back (that would wait for
        the device); a non-finite one reaches the step's guard instead, which reports it at the next read."""
        be = self.backend
        x = be.adopt(x, what)   # another library's device array (torch.cuda, jax): a view of it, no copy
        if not be.is_device_array(x):
            if isinstance(x, (str, bytes)) or x is None:
                raise TypeError(f"{what}: expected a numeric array, got {type(x).__name__}")
            try:
                x = np.asarray(x)
            except Exception as exc:
                raise TypeError(f"{what}: expected a numeric array, got {type(x).__name__} ({exc})") from None
        if np.dtype(x.dtype).kind not in "biuf":
            raise TypeError(f"{what}: expected a numeric array, got dtype {x.dtype}")
        if x.ndim != 1 + len(trailing) or tuple(x.shape[1:]) != tuple(trailing) or x.shape[0] < 1:
            expected = "(N, " + ", ".join(map(str, trailing)) + ")" if trailing else "(N,)"
            raise ValueError(f"{what}: expected shape {expected} with N >= 1, got {tuple(x.shape)}")
        if np.dtype(x.dtype).kind == "f":
            # Finite in the model's dtype: a float64 1e300 would reach a float32 model as inf.
            if isinstance(x, np.ndarray):
                with np.errstate(over="ignore"):
                    finite = bool(np.isfinite(x.astype(self.dtype, copy=False)).all())
            elif on_device:
                finite = True
            else:
                finite = be.all_finite(x if x.dtype == self.dtype else be.asarray(x, self.dtype))
            if not finite:
                raise ValueError(f"{what}: expected finite values in {self.dtype.name}, got NaN, inf or values "
                                 "beyond its range")
        return x

    def _check_X(self, X, on_device=False):
        return self._check_array(X, "X", (self.n_in,), on_device)

    def _check_loss(self, loss):
        loss_id = losses.loss_id(loss)
        required = losses.REQUIRED_ACTIVATION[loss_id]
        last = self.layers[-1]
        if required is not None and last.act != required:
            need = [k for k, v in acts.NAMES.items() if v == required][0]
            raise ValueError(f"loss {loss!r}: needs the last layer's activation to be {need!r} (the fused, "
                             f"stable form), got {last.activation!r}")
        return loss_id

    def _check_y(self, y, loss_id, N, on_device=False):
        """Targets as a float (N, out) array (numpy or device); integer labels (N,) for softmax_ce are returned
        as labels, to be one-hot encoded on the device. on_device: as _check_array; a label out of range then
        becomes a row of NaN (Backend.one_hot) that the guard reports, and bce's [0, 1] range goes unchecked."""
        out = self.n_out
        be = self.backend
        y = be.adopt(y, "y")
        read = lambda a: a if isinstance(a, np.ndarray) else None if on_device else be.to_numpy(a)   # noqa: E731
        if loss_id == losses.SOFTMAX_CE and y is not None and getattr(y, "ndim", np.ndim(y)) == 1:
            y = self._check_array(y, "y", (), on_device)
            if np.dtype(y.dtype).kind not in "iu":
                raise TypeError(f"y: softmax_ce expects integer class labels (N,) or one-hot (N, {out}), got dtype {y.dtype}")
            host = read(y)
            if host is not None and (host.min() < 0 or host.max() >= out):
                raise ValueError(f"y: class labels must lie in [0, {out}), got values from {host.min()} to {host.max()}")
        else:
            if out == 1 and y is not None and getattr(y, "ndim", np.ndim(y)) == 1:
                y = y.reshape(-1, 1) if be.is_device_array(y) else np.asarray(y).reshape(-1, 1)
            y = self._check_array(y, "y", (out,), on_device)
            host = read(y) if loss_id == losses.BCE else None
            if host is not None:
                if host.min() < 0 or host.max() > 1:
                    raise ValueError(f"y: bce targets must lie in [0, 1], got values from {host.min()} to {host.max()}")
        if y.shape[0] != N:
            raise ValueError(f"y: expected {N} rows to match X, got {y.shape[0]}")
        return y

    def _check_optimizer(self, optimizer):
        from .optim import Optimizer
        optimizer = self.optimizer if optimizer is None else optimizer
        if optimizer is None:
            raise ValueError("optimizer: none given and none made for this model yet; pass e.g. gpubp.SGD(net, lr=0.05)")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer: expected a gpubp optimizer (SGD, Adam), got {type(optimizer).__name__}")
        if optimizer.net is not self:
            raise ValueError("optimizer: it was made for another model; make one with this model as its first argument")
        return optimizer

    # ---- the step, in pieces --------------------------------------------------------------------------------
    def _workspace(self, N):
        ws = self._workspaces.pop(N, None)
        if ws is None:
            ws = Workspace(self.backend, self.layers, N, self.dtype,
                           self.backend.storage_dtype(self._gemm_precision) if self.precision else self.dtype,
                           self.fused)
            while len(self._workspaces) >= _MAX_WORKSPACES:
                self._workspaces.popitem(last=False)
        self._workspaces[N] = ws          # most recently used last
        return ws

    def _stage(self, X, y, loss_id, ws):
        """Inputs onto the device: X and float targets used in place when they already are device arrays of our
        dtype, else copied into the workspace; integer labels one-hot encoded into ws.Y."""
        be = self.backend
        X = be.stage(X, ws.X)
        if y is None:
            return X, None, X is ws.X
        if loss_id == losses.SOFTMAX_CE and y.ndim == 1:
            be.one_hot(y, self.n_out, ws.Y)
            Y = ws.Y
        else:
            Y = be.stage(y, ws.Y)
        return X, Y, X is ws.X and Y is ws.Y

    def _fused_args(self):
        """The layers' parameters as the fused ops take them: (Ws, bs, act_ids, alphas)."""
        layers = self.layers
        return ([l.W for l in layers], [l.b for l in layers], [l.act for l in layers], [l.alpha for l in layers])

    def _forward(self, X, ws, keep_z=False):
        """The output A = F(Z_L) of X into ws.A[-1]. keep_z: every Z in ws.Z too (the per-layer path; the fused
        MLP keeps none)."""
        if self.fused and not keep_z:
            self.backend.fused_forward(X, *self._fused_args(), self.precision, ws.A[-1])
            return ws.A[-1]
        if self.params16 is not None:   # the layers' W16, from the parameters as they are now
            self.backend.round_to_storage(self.params, self.params16, self.precision)
        a = X
        for layer, Z, A in zip(self.layers, ws.Z, ws.A):
            layer.forward(self.backend, a, Z, A)
            a = A
        return a

    def _forward_loss_backward(self, X, Y, loss_id, ws, scale=None, gradients_ready=None):
        """Forward, loss and backward: the gradients in self.grads, multiplied by the loss scale for fp16
        (`scale`, a device float64 (1,); default the scaler's). gradients_ready(l), when given, is called as soon
        as layer l's dW and db are written, last layer first (fit with comm: GradientReduction)."""
        be, last = self.backend, self.layers[-1]
        if self.fused:   # forward, loss and backward in the fused kernels, then weight_grad per layer
            be.fused_train(X, Y, loss_id, *self._fused_args(), self.precision, ws.A[-1], ws.hidden, ws.deltas,
                           ws.G[-1], ws.loss, [l.dW for l in self.layers], [l.db for l in self.layers],
                           self._scale if scale is None else scale)
            if gradients_ready is not None:   # one call wrote every layer's: all of them are ready now
                for i in reversed(range(len(self.layers))):
                    gradients_ready(i)
            return
        self._forward(X, ws)
        be.loss_grad(loss_id, last.act, last.alpha, ws.Z[-1], Y, ws.A[-1], ws.G[-1], ws.loss,
                     self._scale if scale is None else scale)
        for i in reversed(range(len(self.layers))):
            A_prev = X if i == 0 else ws.A[i - 1]
            prev = None if i == 0 else (self.layers[i - 1], ws.Z[i - 1], ws.A[i - 1], ws.G[i - 1])
            self.layers[i].backward(be, A_prev, ws.G[i], prev,
                                    None if gradients_ready is None else functools.partial(gradients_ready, i))

    def _step_ops(self, X, Y, loss_id, optimizer, ws, reduction=None):
        """Every launch of a train step on staged inputs, in stream order; nothing here waits for the host.
        reduction (fit with comm, a distributed.GradientReduction): told in backward as each layer's gradients
        are written, and finished between backward and the guard: this rank's gradients and loss become the
        global batch's (gpubp/distributed.py); X None: this rank has no rows in the step and only takes part."""
        be = self.backend
        loss_out = None
        if X is not None:
            self._forward_loss_backward(X, Y, loss_id, ws,
                                        gradients_ready=None if reduction is None else reduction.gradients_ready)
            loss_out = ws.loss
        if reduction is not None:
            loss_out = reduction.finish()
        if self.scaler is None:   # the update checks the gradients itself (gpubp/guard.py)
            be.guard_loss(loss_out, self.guard)
            optimizer.step(self.guard)
        else:   # fp16: gradients unscaled and an overflow skips the step (gpubp/loss_scale.py)
            be.unscale_gradients(loss_out, self.grads, self.scaler, self.guard)
            optimizer.step(self.guard)
            be.update_scale(self.scaler, self.guard)
        if X is not None:
            be.record_step(loss_id, loss_out, ws.A[-1], Y, self.guard)

    # ---- the guard: read rarely, by the host --------------------------------------------------------------
    @property
    def steps(self):
        """Train steps taken (good ones). Reading it waits for the steps launched with sync=False."""
        if self._pending:
            self.sync()
        return self._steps

    @steps.setter
    def steps(self, value):
        self._steps, self._pending = int(value), 0
        self.backend.copy_into(self._guard_head, G.fresh(self._steps))

    def sync(self):
        """Wait for every step launched so far and read the guard (one device-to-host copy). Raises
        FloatingPointError (a gpubp.guard.StepFault, whose .step is the faulty step), naming the step and the
        layer, when one of those steps faulted; the model then holds the parameters and optimizer state of the
        last good step. Returns the guard as a numpy array."""
        guard = self.backend.to_numpy(self.guard)
        self._steps, self._pending = int(guard[G.STEP]), 0
        if guard[G.FAULT]:
            error = G.fault(guard, self.layout, self.layers,
                            self.optimizer.state_names if self.optimizer is not None else ())
            self.steps = self._steps   # a fresh guard: the next step starts clean
            raise error
        return guard

    def _loss_of_step(self, step):
        """The loss of good step `step` from the guard's ring (see LazyLoss)."""
        guard = self.sync()
        if not self._steps - G.RING_SIZE <= step < self._steps:
            raise ValueError(f"the loss of train step {step} is no longer kept: only the last {G.RING_SIZE} "
                             "are; read a lazy loss sooner")
        return float(guard[G.RING + step % G.RING_SIZE])

    # ---- public API ------------------------------------------------------------------------------------------
    def train_step(self, X, y, loss, optimizer=None, sync=True):
        """Forward, backward and one in-place update on the batch (X, y).

        sync=True: waits for the step and returns its loss (a float); a numerical fault raises
        FloatingPointError here. sync=False: returns at once with a LazyLoss; nothing waits for the device, and
        a fault is raised at the next read (float() of any LazyLoss, net.sync(), net.steps, a sync=True step).
        After a fault the following steps are skipped until that read, so the parameters stay those of the last
        good step. With sync=False the values of device-array inputs are not read back either: NaN or inf in them,
        or a label out of range, is reported by the guard as a fault at the next read (not as a ValueError here),
        and bce targets on the device are not checked against [0, 1]. NumPy inputs are checked as always."""
        if not isinstance(sync, bool):
            raise TypeError(f"sync: expected True or False, got {sync!r}")
        loss_id = self._check_loss(loss)
        optimizer = self._check_optimizer(optimizer)
        X = self._check_X(X, on_device=not sync)
        y = L.encode(y, loss_id, self.n_out, self.classes, fitting=False)[0]
        y = self._check_y(y, loss_id, X.shape[0], on_device=not sync)
        self.loss = loss
        return self._train_step(X, y, loss_id, optimizer, sync)

    def _train_step(self, X, y, loss_id, optimizer, sync=True):
        """The step on validated inputs (train_step without its checks; the bench times both)."""
        N = X.shape[0]
        ws = self._workspace(N)
        Xd, Yd, staged = self._stage(X, y, loss_id, ws)
        key = ("train", N, loss_id, optimizer.key()) if staged else None
        step = self._steps + self._pending
        optimizer._follow_schedule(step, "step")
        # Non-finite values are caught by the guard; numpy's overflow warnings would only repeat them, or, where
        # warnings are errors, stop an update half-way through its buffers.
        with np.errstate(over="ignore", invalid="ignore"):
            self.backend.run_step(key, lambda: self._step_ops(Xd, Yd, loss_id, optimizer, ws))
        self._pending += 1
        lazy = LazyLoss(self, step)
        return float(lazy) if sync else lazy

    def gradients(self, X, y, loss):
        """[{"W": dW, "b": db}] per layer as numpy arrays, for the batch (X, y); no update.
        fp16: computed loss-scaled as a train step is, from the scaler's current scale, halved (here, not in
        the scaler) until no gradient overflows; then divided by it."""
        loss_id = self._check_loss(loss)
        X = self._check_X(X)
        y = self._check_y(y, loss_id, X.shape[0])
        ws = self._workspace(X.shape[0])
        Xd, Yd, staged = self._stage(X, y, loss_id, ws)
        if self.scaler is None:
            key = ("gradients", X.shape[0], loss_id) if staged else None
            with np.errstate(over="ignore", invalid="ignore"):   # an overflow shows in the values returned
                self.backend.run_step(key, lambda: self._forward_loss_backward(Xd, Yd, loss_id, ws))
            return self.layout.unflatten(self.backend.to_numpy(self.grads))
        scale, scale_device = self.loss_scale[0], self.backend.empty((1,), np.float64)
        for _ in range(200):   # 2^-200 · MAX_SCALE is below any gradient that could overflow
            self.backend.copy_into(scale_device, np.array([scale]))
            with np.errstate(over="ignore", invalid="ignore"):
                self._forward_loss_backward(Xd, Yd, loss_id, ws, scale_device)
            grads = self.backend.to_numpy(self.grads)
            if np.isfinite(grads).all() or not np.isfinite(self.backend.to_numpy(ws.loss)[0]):
                break   # no overflow, or a non-finite loss, which no scale mends (it shows in the values returned)
            scale /= 2
        return self.layout.unflatten(grads / grads.dtype.type(scale))

    def predict(self, X, batch_size=None, device=False):
        """The network's output A = F(Z) for every row of X, as a numpy array (N, out): the last layer's activation
        applied, nothing more. So for a model trained with bce (sigmoid output) it is the probability of the
        positive class (of each output); with softmax_ce (identity output; the softmax is part of the loss) it is
        the logits, not probabilities; with mse it is the prediction itself. predict_proba and predict_classes
        give probabilities and labels whatever the loss. device=True: as the backend's own device array (cupy,
        numba; numpy on the numpy backend), with no copy to the host."""
        X = self._check_X(X)
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1):
            raise ValueError(f"batch_size: expected a positive integer or None, got {batch_size!r}")
        if not isinstance(device, bool):
            raise TypeError(f"device: expected True or False, got {device!r}")
        N = X.shape[0]
        step = N if batch_size is None else int(batch_size)
        chunks = []
        out = self.backend.empty((N, self.n_out), self.dtype) if device else None
        for start in range(0, N, step):
            part = X[start:start + step]
            ws = self._workspace(part.shape[0])
            staged, _, _ = self._stage(part, None, None, ws)
            A = self._forward(staged, ws)
            if device:   # a device-to-device copy: the workspace is reused by the next call
                self.backend.copy_into(out[start:start + part.shape[0]], A)
            else:
                chunks.append(self.backend.to_numpy(A))
        if device:
            return out
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    # What fit last trained with: the loss name and the original class labels (gpubp/labels.py); both saved.
    loss = None
    _classes = None
    # Set by fit: its History (from before the first epoch), and the flag a callback sets to stop it.
    history = None
    stop_training = False

    @property
    def classes(self):
        """The original class labels as a numpy array, in output order (softmax_ce) or [negative, positive] (one
        bce output); None when the labels were indices already. fit sets them from the labels it sees; set them
        before fit to fix them (say, every class of a data set whose training rows miss one)."""
        return self._classes

    @classes.setter
    def classes(self, value):
        self._classes = None if value is None else L.check_classes(value, self.n_out)

    def predict_proba(self, X, batch_size=None):
        """Probabilities (N, out) for the loss the model was trained with (self.loss): bce, the sigmoid output as
        it is (each output's probability of its positive class); softmax_ce, the softmax of the logits (rows sum
        to 1). A regression (mse) model has none: ValueError."""
        proba_of = self._loss_for("predict_proba")
        out = self.predict(X, batch_size)
        return proba_of(out)

    def predict_classes(self, X, batch_size=None):
        """The predicted class of each row (N,), as the original labels where fit saw labels (self.classes), else
        as indices: softmax_ce, the arg-max output; one bce output, classes[1] where its probability is above 0.5.
        Several bce outputs (multi-label): (N, out) of 0 and 1. A regression (mse) model: ValueError."""
        self._loss_for("predict_classes")
        out = self.predict(X, batch_size)
        if self.loss == "softmax_ce":
            index = out.argmax(axis=1)
        elif self.n_out == 1:
            index = (out[:, 0] > 0.5).astype(np.int64)
        else:
            return (out > 0.5).astype(np.int64)
        return index if self.classes is None else self.classes[index]

    def _loss_for(self, what):
        """The function from outputs to probabilities for self.loss; ValueError where there is none."""
        if self.loss is None:
            raise ValueError(f"{what}: the model does not know its loss yet; fit it (or train_step) first, or set "
                             "net.loss to 'bce' or 'softmax_ce'")
        if self.loss == "mse":
            raise ValueError(f"{what}: this model was trained with mse (a regression): it has no probabilities or "
                             "classes; use predict")
        if self.loss == "bce":
            return lambda out: out
        if self.loss == "softmax_ce":
            return _softmax
        raise ValueError(f"{what}: net.loss is {self.loss!r}; expected 'bce', 'softmax_ce' or 'mse'")

    def evaluate(self, X, y, loss):
        """(loss, accuracy) on (X, y) without updating anything; accuracy is None for mse. y may hold the model's
        original class labels (self.classes)."""
        y = L.encode(y, self._check_loss(loss), self.n_out, self.classes, fitting=False)[0]
        return self._evaluate(X, y, loss)

    def _evaluate(self, X, y, loss):
        """evaluate on targets already encoded: staged into the workspace, then _evaluate_staged (one read)."""
        loss_id = self._check_loss(loss)
        X = self._check_X(X)
        y = self._check_y(y, loss_id, X.shape[0])
        ws = self._workspace(X.shape[0])
        Xd, Y, _ = self._stage(X, y, loss_id, ws)
        return self._evaluate_staged(Xd, Y, loss_id, ws)

    # The evaluation guard: a guard (gpubp/guard.py) of its own that record_step writes one evaluation into, and
    # a device copy of its fresh head (STEP = 1, so the loss lands in ring slot 0); made on first use.
    _evaluation_guard = None
    _evaluation_fresh = None

    def _evaluate_staged(self, X, Y, loss_id, ws):
        """(loss, accuracy; None for mse) of the model on device arrays X, Y, without updating anything: forward,
        the fused loss and record_step into the evaluation guard, whose head the host reads once (fit's
        validation: one read per epoch). record_step keeps the loss as it is (ring slot 0) and CORRECT as
        (count / compared)·rows in float64: the count is recovered from it exactly (an integer, far below 2⁵³),
        so the accuracy is count / compared, numpy's gpubp.losses.accuracy bit for bit."""
        be, last = self.backend, self.layers[-1]
        if self._evaluation_guard is None:
            self._evaluation_guard = be.zeros((G.SIZE,), np.float64)
            self._evaluation_fresh = be.asarray(G.fresh(1), np.float64)
        head = be.view(self._evaluation_guard, 0, (G.RING,))
        be.copy_into(head, self._evaluation_fresh)   # device to device: nothing crosses from the host
        with np.errstate(over="ignore", invalid="ignore"):   # an overflow shows in the loss returned
            self._forward(X, ws, keep_z=True)   # the loss needs Z_L: the per-layer forward
            be.loss_grad(loss_id, last.act, last.alpha, ws.Z[-1], Y, ws.A[-1], ws.G[-1], ws.loss)
            be.record_step(loss_id, ws.loss, ws.A[-1], Y, self._evaluation_guard)
        guard = be.to_numpy(be.view(self._evaluation_guard, 0, (G.RING + 1,)))
        if not losses.accuracy_applies(loss_id):
            return float(guard[G.RING]), None
        rows = X.shape[0]
        compared = rows * (self.n_out if loss_id == losses.BCE else 1)
        count = round(float(guard[G.CORRECT]) * compared / rows)
        return float(guard[G.RING]), count / compared

    def get_params(self):
        """[{"W": (out, in), "b": (out,)}] per layer as numpy copies; "b" absent where bias=False."""
        return self.layout.unflatten(self.backend.to_numpy(self.params))

    def set_params(self, params):
        """Replace every parameter; the same layout get_params returns. Checked whole before anything is set."""
        if not isinstance(params, (list, tuple)) or len(params) != len(self.layers):
            raise ValueError(f"params: expected a list of {len(self.layers)} dicts (one per layer), got "
                             f"{type(params).__name__}{' of length %d' % len(params) if isinstance(params, (list, tuple)) else ''}")
        checked = []
        for i, (layer, p) in enumerate(zip(self.layers, params)):
            names = [name for name, _ in layer.param_shapes()]
            if not isinstance(p, dict) or sorted(p) != sorted(names):
                raise ValueError(f"params[{i}]: expected a dict with keys {names}, got "
                                 f"{sorted(p) if isinstance(p, dict) else type(p).__name__}")
            entry = {}
            for name, shape in layer.param_shapes():
                a = p[name]
                if isinstance(a, (str, bytes)) or np.asarray(a).dtype.kind not in "biuf":
                    raise TypeError(f"params[{i}][{name!r}]: expected a numeric array, got {type(a).__name__}")
                a = np.asarray(a)
                if a.shape != shape:
                    raise ValueError(f"params[{i}][{name!r}]: expected shape {shape}, got {a.shape}")
                with np.errstate(over="ignore"):
                    finite = bool(np.isfinite(a.astype(self.dtype)).all())   # 1e300 is inf in float32
                if not finite:
                    raise ValueError(f"params[{i}][{name!r}]: expected finite values in {self.dtype.name}, got "
                                     "NaN, inf or values beyond its range")
                entry[name] = a
            checked.append(entry)
        self.backend.copy_into(self.params, self.layout.flatten(checked, self.dtype))

    def fit(self, X, y, loss, optimizer=None, epochs=1, batch_size=32, shuffle=True, validation_data=None,
            on_epoch_end=None, on_batch_end=None, check_every=None, log_every=None, callbacks=None, verbose=0,
            initial_epoch=0, comm=None, steps_per_graph=1):
        """Mini-batch training. Returns a History: per-epoch "loss" (the mean training loss over the epoch's
        batches), "accuracy" where it applies (Keras-style: each batch's predictions before its update), and
        "val_loss"/"val_accuracy" with validation_data. Those keys are always there (lists, empty when no epoch
        finished), and history.stop_reason says why fit stopped early (None when it ran every epoch).

        Epochs run from `initial_epoch` to `epochs` - 1 (Keras: `epochs` is the index to stop at, so a resumed run
        passes the epochs it has done as initial_epoch). verbose: 0 silent, 1 a progress bar per epoch (tqdm on
        stderr, updated every `log_every` batches, by default about 20 times an epoch and never every batch),
        2 one line per epoch on stderr.

        callbacks: gpubp.callbacks.Callback objects (EarlyStopping, ModelCheckpoint, your own), told of each epoch
        and asked whether to stop (gpubp/callbacks.py). The older arguments still work: on_epoch_end(epoch, logs)
        after each epoch (it may return "stop", as Callback.on_epoch_end), and on_batch_end(batch, n_batches, loss)
        every `log_every` batches (default 1 when it is given) with that batch's loss; epoch and batch are
        0-based. A callback that raises stops fit at once: the exception carries the History as `exc.history`
        (also `net.history`, which fit sets before its first epoch), with stop_reason naming the exception.

        The loop does not wait for the host per step: X and y go to the device once, each epoch's order is
        drawn from the model's seeded generator (so a run is reproducible and resumable from a checkpoint) and
        uploaded once, batches are gathered on the device, and the loss and accuracy are summed there. The host
        reads the guard (gpubp/guard.py) once per epoch, and also every `check_every` steps and every
        `log_every` steps when given; each read costs one device-to-host copy. validation_data goes to the
        device once per fit, and each epoch's val_loss and val_accuracy come back in one more read.
        A non-finite step stops training at the next read, keeps the parameters of the last good step and says
        so (a RuntimeWarning, history.stop_reason naming the epoch, batch and layer, and history.fault holding
        the FloatingPointError); the steps between the fault and that read are skipped.

        steps_per_graph (a measured option, default 1): k > 1 runs up to k consecutive full batches as one step
        closure, which the cupy backend captures and replays as one CUDA graph (fewer launches from the host);
        a group never crosses a read (check_every, log_every, the epoch's end), and the run is the one of
        single steps bit for bit. Refused (ValueError) with comm and with a per-step learning-rate schedule,
        which need the host between steps.

        comm (gpubp.distributed.init()): data-parallel over its ranks; batch_size is per rank, so each step
        trains on batch_size × comm.size rows, and every rank ends with the same model, the one a single process
        trains with that global batch (to rounding); the history holds global metrics, every rank reads the device
        at the same steps, and a callback that stops training on one rank stops every rank (gpubp/distributed.py).
        init(overlap=True) sums the gradients bucket by bucket during backward instead of once after it: the
        same model, bit for bit on MPI.

        Threads (numpy backend): the time goes into NumPy's BLAS, which starts a thread per core. On a machine
        shared with other work, or to compare timings, fix the count with threadpoolctl:
        `with threadpoolctl.threadpool_limits(2): net.fit(...)` (the command line's --threads, the bench's
        --threads)."""
        from . import callbacks as cbm
        loss_id = self._check_loss(loss)
        optimizer = self._check_optimizer(optimizer)
        for value, what in ((epochs, "epochs"), (batch_size, "batch_size")):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{what}: expected a positive integer, got {value!r}")
        if isinstance(initial_epoch, bool) or not isinstance(initial_epoch, numbers.Integral) \
                or not 0 <= initial_epoch <= epochs:
            raise ValueError(f"initial_epoch: expected an integer from 0 to epochs ({epochs}), got {initial_epoch!r}")
        for value, what in ((check_every, "check_every"), (log_every, "log_every")):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
                raise ValueError(f"{what}: expected a positive integer or None, got {value!r}")
        if not isinstance(shuffle, bool):
            raise TypeError(f"shuffle: expected True or False, got {shuffle!r}")
        if isinstance(verbose, bool) or verbose not in (0, 1, 2):
            raise ValueError(f"verbose: expected 0 (silent), 1 (a progress bar) or 2 (a line per epoch), "
                             f"got {verbose!r}")
        for value, what in ((on_epoch_end, "on_epoch_end"), (on_batch_end, "on_batch_end")):
            if value is not None and not callable(value):
                raise TypeError(f"{what}: expected a callable or None, got {type(value).__name__}")
        user_callbacks = cbm.check_callbacks(callbacks)
        X = self._check_X(X)
        y, classes = L.encode(y, loss_id, self.n_out, self.classes, fitting=True)   # labels -> indices, once
        y = self._check_y(y, loss_id, X.shape[0])
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise ValueError("validation_data: expected a pair (X_val, y_val)")
            Xv = self._check_X(validation_data[0])
            yv = L.encode(validation_data[1], loss_id, self.n_out, classes, fitting=False)[0]
            yv = self._check_y(yv, loss_id, Xv.shape[0])
        trained = ["loss"] + (["accuracy"] if losses.accuracy_applies(loss_id) else [])
        metrics = trained + (["loss_scale"] if self.scaler is not None else [])
        if validation_data is not None:
            metrics += ["val_" + name for name in trained]
        for cb in user_callbacks:
            cb.check_metrics(list(metrics))
        if optimizer.schedule is not None:
            optimizer.schedule.check_metrics(list(metrics))
        comm = distributed.check_comm(comm)
        if isinstance(steps_per_graph, bool) or not isinstance(steps_per_graph, numbers.Integral) \
                or steps_per_graph < 1:
            raise ValueError(f"steps_per_graph: expected a positive integer, got {steps_per_graph!r}")
        if steps_per_graph > 1 and comm is not None:
            raise ValueError(f"steps_per_graph={steps_per_graph}: not with comm (each step all-reduces "
                             "between ranks); leave steps_per_graph at 1")
        if steps_per_graph > 1 and optimizer.schedule is not None and optimizer.schedule.per == "step":
            raise ValueError(f"steps_per_graph={steps_per_graph}: not with a per-step learning-rate schedule "
                             f"({optimizer.schedule!r}: the rate is written between steps, which one replay of "
                             "several steps leaves no room for); use per='epoch' or steps_per_graph=1")
        self.sync()   # steps launched before fit are settled first (a pending fault is raised here)

        n_batches = -(-X.shape[0] // (batch_size * (1 if comm is None else comm.size)))   # global batches
        callbacks = ([cbm.ProgressBar(bar=verbose == 1)] if verbose else []) + user_callbacks
        if on_epoch_end is not None or on_batch_end is not None:
            callbacks.append(cbm.FitArguments(on_epoch_end, on_batch_end))
        if log_every is None and verbose == 1:
            log_every = cbm.progress_log_every(n_batches)
        elif log_every is None and any(cb.wants_batches() for cb in callbacks):
            log_every = 1
        data_parallel = None if comm is None else comm.data_parallel(self, optimizer, {
            "loss": loss, "epochs": epochs, "initial_epoch": initial_epoch, "batch_size": batch_size,
            "shuffle": shuffle, "rows": X.shape[0], "check_every": check_every}, log_every)
        self.loss, self._classes = loss, classes
        data = DeviceData(self, X, y, loss_id, batch_size, optimizer, data_parallel)
        N = data.rows
        history = History({name: [] for name in metrics})
        self.history, self.stop_training = history, False
        params = {"epochs": epochs, "initial_epoch": initial_epoch, "batches": n_batches, "rows": N,
                  "batch_size": batch_size * (1 if comm is None else comm.size),   # a step's rows, all ranks
                  "metrics": list(metrics)}
        callback_list = cbm.CallbackList(callbacks, self, params)
        try:
            callback_list.on_train_begin()
            self._fit_epochs(data, loss_id, loss, history, callback_list, range(initial_epoch, epochs), shuffle,
                             check_every, log_every,
                             ValidationData(self, Xv, yv, loss_id) if validation_data is not None else None,
                             steps_per_graph)
            callback_list.on_train_end({name: values[-1] for name, values in history.items() if values})
        except BaseException as exc:
            callback_list.close()
            if history.stop_reason is None:
                history.stop_reason = f"{type(exc).__name__} raised during fit: {exc}"
            try:
                exc.history = history
            except Exception:    # an exception type that takes no attributes: net.history still has it
                pass
            raise
        return history

    def _fit_epochs(self, data, loss_id, loss, history, callback_list, epochs, shuffle, check_every, log_every,
                    validation, steps_per_graph=1):
        """fit's loop over validated inputs; fills `history`, stops on a fault or when a callback asks."""
        N, optimizer, n_batches, data_parallel = data.rows, data.optimizer, data.n_batches, data.data_parallel
        # data-parallel: every rank reads the device at the same steps, so all see a fault at the same step
        read_every = log_every if data_parallel is None else data_parallel.read_every

        def read_after(done):
            """Whether the host reads the guard once `done` batches of the epoch are launched."""
            return (done == n_batches or (check_every is not None and done % check_every == 0)
                    or (read_every is not None and done % read_every == 0))
        for epoch in epochs:
            optimizer._follow_schedule(epoch, "epoch")
            callback_list.on_epoch_begin(epoch)
            permutation = self.rng.permutation(N) if shuffle else np.arange(N)
            self.backend.copy_into(self._guard_head, G.fresh(self._steps))   # the epoch's sums start at 0
            epoch_start, batch_stop, done = self._steps, None, 0
            for steps, key, step in data.batches(permutation, steps_per_graph, read_after):
                optimizer._follow_schedule(self._steps + self._pending, "step")   # (refused with steps > 1)
                with np.errstate(over="ignore", invalid="ignore"):   # the guard catches overflow
                    self.backend.run_step(key, step)
                self._pending += steps
                done += steps
                b = done - 1
                if not read_after(done):
                    continue
                try:
                    guard = self.sync()
                except G.StepFault as err:
                    history.stop_reason = (f"epoch {epoch + 1}, batch {err.step - epoch_start + 1} of {n_batches}: "
                                           f"{err}")
                    history.fault = err
                    warnings.warn(f"fit stopped: {history.stop_reason}", RuntimeWarning, stacklevel=3)
                    return
                if log_every is not None and done % log_every == 0:
                    batch_stop = callback_list.on_batch_end(epoch, b, {
                        "loss": float(guard[G.RING + (self._steps - 1) % G.RING_SIZE]),
                        "epoch_loss": float(guard[G.LOSS_SUM] / guard[G.ROWS])})
                    if self.stop_training and data_parallel is None:   # asked in on_batch_end: the epoch ends here
                        break
                if data_parallel is not None and data_parallel.any_rank(self.stop_training):
                    if not self.stop_training:   # asked on another rank: every rank ends the epoch at this step
                        batch_stop = (f"a callback on another rank stopped training in epoch {epoch + 1}, "
                                      f"batch {done}")
                    self.stop_training = True
                    break
            loss_sum, correct, rows = guard[[G.LOSS_SUM, G.CORRECT, G.ROWS]]
            if data_parallel is not None:   # every rank's share of the epoch
                loss_sum, correct, rows = data_parallel.sum_epoch((loss_sum, correct, rows))
            # the rows of the good steps: N, unless a callback ended the epoch early or fp16 skipped an overflow
            rows = max(rows, 1)
            logs = {"loss": loss_sum / rows}
            if losses.accuracy_applies(loss_id):
                logs["accuracy"] = correct / rows
            if self.scaler is not None:   # fp16: the scale now and the overflow skips so far (one more read)
                logs["loss_scale"], history.overflow_steps = self.loss_scale
            logs = {k: float(v) for k, v in logs.items()}
            if validation is not None:
                logs["val_loss"], val_accuracy = self._evaluate_staged(validation.X, validation.Y, loss_id,
                                                                       self._workspace(validation.X.shape[0]))
                if val_accuracy is not None:
                    logs["val_accuracy"] = val_accuracy
            for k, v in logs.items():
                history[k].append(v)
            history.epoch.append(epoch)
            if optimizer.schedule is not None:
                optimizer.schedule.observe(logs)
            reason = callback_list.on_epoch_end(epoch, logs)
            stop_here = reason is not None or self.stop_training
            if data_parallel is not None and data_parallel.any_rank(stop_here) and not stop_here:
                reason = f"a callback on another rank stopped training in epoch {epoch + 1}"
            if reason is not None or self.stop_training:
                history.stop_reason = reason or batch_stop or f"model.stop_training was set in epoch {epoch + 1}"
                return

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def save(self, path, extra=None):
        """Checkpoint to `path` (atomic); `extra`: a JSON-able dict returned by gpubp.load as net.extra."""
        from .serialize import save
        save(self, path, extra=extra)


def _softmax(logits):
    """Row-wise softmax of numpy logits (N, out), shifted by each row's maximum so exp cannot overflow."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
