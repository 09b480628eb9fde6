"""Sequential: the model. Public methods validate everything first, then delegate to the backend ops through
the layers, the loss and the optimizer, so a failed call leaves the model exactly as it was.

A train step, in the seed's order:
    forward    for each layer: Z = A_prev · Wᵀ + b, A = g(Z)
    loss       L and δ_out = ∂L/∂Z_out, fused with the output activation (gpubp.losses)
    backward   for each layer, last to first: dW = δᵀ · A_prev; db = Σ δ; δ_prev = (δ · W) ⊙ g'(Z_prev)
    check      L and every gradient finite, else FloatingPointError and no update
    update     θ ← θ − η · (optimizer's direction), in place over the flat parameter buffer
"""
import json
import math
import numbers
import warnings
from collections import OrderedDict

import numpy as np

from . import activations as acts
from . import losses
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


class Workspace:
    """Every buffer a step at batch size N touches, allocated once: then a step allocates nothing.
    Per layer: Z and A (N, out), and G (N, out), which holds the layer's δ = dA ⊙ g'(Z)."""

    def __init__(self, be, layers, N, dtype):
        self.X = be.empty((N, layers[0].n_in), dtype)
        self.Y = be.empty((N, layers[-1].n_out), dtype)
        self.Z = [be.empty((N, layer.n_out), dtype) for layer in layers]
        self.A = [be.empty((N, layer.n_out), dtype) for layer in layers]
        self.G = [be.empty((N, layer.n_out), dtype) for layer in layers]
        self.loss = be.zeros((1,), dtype)


class History(dict):
    """Per-epoch metrics, Keras-style: history["loss"], history["val_loss"], history["accuracy"], ...
    `stop_reason` is None unless fit stopped early (a non-finite step)."""

    stop_reason = None

    @property
    def history(self):
        return self


class Sequential:
    def __init__(self, *layers, backend="auto", dtype="float32", seed=0, deterministic=False):
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
        self.layers = list(layers)
        self.dtype = np.dtype(dtype)
        self.seed = int(seed)
        self.deterministic = deterministic
        self.backend = get_backend(backend, deterministic=deterministic)
        self.rng = np.random.default_rng(self.seed)   # initialisation, then fit's shuffling
        self.layout = FlatLayout(self.layers)
        self.params = self.backend.empty((self.layout.size,), self.dtype)
        self.grads = self.backend.zeros((self.layout.size,), self.dtype)
        self._bind()
        self.backend.copy_into(self.params, self.layout.flatten(
            [layer.init_params(self.rng) for layer in self.layers], self.dtype))
        self.optimizer = None     # the optimizer made for this model last; saved with it
        self.steps = 0            # train steps taken
        self._workspaces = OrderedDict()
        self._rollback = (None, {})   # (optimizer, copies of what its update overwrites): _keep_for_rollback

    def _bind(self):
        for layer, p, g in zip(self.layers, self.layout.views(self.backend, self.params),
                               self.layout.views(self.backend, self.grads)):
            layer.W, layer.b, layer.dW, layer.db = p["W"], p.get("b"), g["W"], g.get("b")

    @property
    def n_in(self):
        return self.layers[0].n_in

    @property
    def n_out(self):
        return self.layers[-1].n_out

    def __repr__(self):
        inner = ", ".join(map(repr, self.layers))
        return f"Sequential({inner}, backend={self.backend.name!r}, dtype={self.dtype.name!r}, seed={self.seed})"

    # ---- validation: everything is checked before anything is touched -------------------------------------
    def _check_array(self, x, what, trailing):
        """`x` as a numpy array or a device array of our backend, numeric, finite, of shape (N, *trailing)."""
        be = self.backend
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
            else:
                finite = be.all_finite(x if x.dtype == self.dtype else be.asarray(x, self.dtype))
            if not finite:
                raise ValueError(f"{what}: expected finite values in {self.dtype.name}, got NaN, inf or values "
                                 "beyond its range")
        return x

    def _check_X(self, X):
        return self._check_array(X, "X", (self.n_in,))

    def _check_loss(self, loss):
        loss_id = losses.loss_id(loss)
        required = losses.REQUIRED_ACTIVATION[loss_id]
        last = self.layers[-1]
        if required is not None and last.act != required:
            need = [k for k, v in acts.NAMES.items() if v == required][0]
            raise ValueError(f"loss {loss!r}: needs the last layer's activation to be {need!r} (the fused, "
                             f"stable form), got {last.activation!r}")
        return loss_id

    def _check_y(self, y, loss_id, N):
        """Targets as a float (N, out) array (numpy or device); integer labels (N,) for softmax_ce are returned
        as labels, to be one-hot encoded on the device."""
        out = self.n_out
        be = self.backend
        if loss_id == losses.SOFTMAX_CE and y is not None and getattr(y, "ndim", np.ndim(y)) == 1:
            y = self._check_array(y, "y", ())
            if np.dtype(y.dtype).kind not in "iu":
                raise TypeError(f"y: softmax_ce expects integer class labels (N,) or one-hot (N, {out}), got dtype {y.dtype}")
            host = y if isinstance(y, np.ndarray) else be.to_numpy(y)
            if host.min() < 0 or host.max() >= out:
                raise ValueError(f"y: class labels must lie in [0, {out}), got values from {host.min()} to {host.max()}")
        else:
            if out == 1 and y is not None and getattr(y, "ndim", np.ndim(y)) == 1:
                y = y.reshape(-1, 1) if be.is_device_array(y) else np.asarray(y).reshape(-1, 1)
            y = self._check_array(y, "y", (out,))
            if loss_id == losses.BCE:
                host = y if isinstance(y, np.ndarray) else be.to_numpy(y)
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
            ws = Workspace(self.backend, self.layers, N, self.dtype)
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

    def _forward(self, X, ws):
        a = X
        for layer, Z, A in zip(self.layers, ws.Z, ws.A):
            layer.forward(self.backend, a, Z, A)
            a = A
        return a

    def _forward_loss_backward(self, X, Y, loss_id, ws):
        be, last = self.backend, self.layers[-1]
        self._forward(X, ws)
        be.loss_grad(loss_id, last.act, last.alpha, ws.Z[-1], Y, ws.A[-1], ws.G[-1], ws.loss)
        for i in reversed(range(len(self.layers))):
            A_prev = X if i == 0 else ws.A[i - 1]
            prev = None if i == 0 else (self.layers[i - 1], ws.Z[i - 1], ws.A[i - 1], ws.G[i - 1])
            self.layers[i].backward(be, A_prev, ws.G[i], prev)

    def _loss_and_gradients(self, X, y, loss_id):
        """Forward, loss and backward into self.grads; returns the loss (a float, synchronises) and the
        workspace, whose A[-1] holds the batch's predictions."""
        N = X.shape[0]
        ws = self._workspace(N)
        X, Y, staged = self._stage(X, y, loss_id, ws)
        key = ("train", N, loss_id) if staged else None
        self.backend.run_step(key, lambda: self._forward_loss_backward(X, Y, loss_id, ws))
        return float(self.backend.to_numpy(ws.loss)[0]), ws

    # ---- public API ------------------------------------------------------------------------------------------
    def train_step(self, X, y, loss, optimizer=None):
        """Forward, backward and one in-place update on the batch (X, y); returns the batch loss (float)."""
        loss_id = self._check_loss(loss)
        optimizer = self._check_optimizer(optimizer)
        X = self._check_X(X)
        y = self._check_y(y, loss_id, X.shape[0])
        return self._train_step(X, y, loss_id, optimizer)[0]

    def _train_step(self, X, y, loss_id, optimizer):
        """The step on validated inputs: (loss, the batch's predictions before the update, on the device).

        Finite gradients can still overflow the update (a huge learning rate, Adam's g² in float32), so the
        check comes after it, over gradients, parameters and optimizer state at once (one synchronisation),
        and a failed check puts back the copies taken just before the update."""
        # Non-finite values are found and reported by the check below; numpy's overflow warnings would only
        # repeat them, or, where warnings are errors, stop an update half-way through its buffers.
        with np.errstate(over="ignore", invalid="ignore"):
            value, ws = self._loss_and_gradients(X, y, loss_id)
            if not math.isfinite(value):
                raise FloatingPointError(f"train step {self.steps}: the loss is not finite ({value}); the "
                                         "parameters were left as they were; lower the learning rate or check the inputs")
            buffers = self._update_buffers(optimizer)
            self._keep_for_rollback(optimizer, buffers)
            self.backend.run_step(("update", optimizer.key()), optimizer.step)
            if not self.backend.all_finite_many([self.grads] + list(buffers.values())):
                report = self._nonfinite_report(buffers)
                for name, kept in self._rollback[1].items():
                    self.backend.copy_into(buffers[name], kept)
                raise FloatingPointError(report)
        self.steps += 1
        return value, ws.A[-1]

    def _update_buffers(self, optimizer):
        """{name: buffer} of everything an update writes: the parameters and the optimizer state. (The step
        count is an integer and cannot overflow into NaN, but it is put back too.)"""
        return {"params": self.params, **optimizer.state, "step": optimizer.step_count}

    def _keep_for_rollback(self, optimizer, buffers):
        """Copy what the update is about to overwrite into buffers allocated once per optimizer."""
        if self._rollback[0] is not optimizer:
            self._rollback = (optimizer, {k: self.backend.empty(tuple(b.shape), b.dtype) for k, b in buffers.items()})
        for name, buf in buffers.items():
            self.backend.copy_into(self._rollback[1][name], buf)

    def _nonfinite_report(self, buffers):
        """The message of a failed step: the first layer whose gradient, or else whose updated parameters or
        optimizer state, went NaN or inf (the slow path: only after a failure, before the rollback)."""
        be = self.backend
        for name, flat in [("gradient", self.grads)] + [(n, b) for n, b in buffers.items() if n != "step"]:
            for i, views in enumerate(self.layout.views(be, flat)):
                if not all(be.all_finite(v) for v in views.values()):
                    what = ("the gradient" if name == "gradient" else "the update made the parameters" if name == "params"
                            else f"the update made the optimizer state {name!r}")
                    return (f"train step {self.steps}: {what} of layer {i} ({self.layers[i]!r}) not finite; the "
                            "parameters and optimizer state were left as they were before this step; lower the "
                            "learning rate or check the inputs")
        return f"train step {self.steps}: a value went NaN or inf; the model was left as it was before this step"

    def gradients(self, X, y, loss):
        """[{"W": dW, "b": db}] per layer as numpy arrays, for the batch (X, y); no update."""
        loss_id = self._check_loss(loss)
        X = self._check_X(X)
        y = self._check_y(y, loss_id, X.shape[0])
        with np.errstate(over="ignore", invalid="ignore"):   # an overflow shows in the values returned
            self._loss_and_gradients(X, y, loss_id)
        return self.layout.unflatten(self.backend.to_numpy(self.grads))

    def predict(self, X, batch_size=None):
        """The network's output A = F(Z) for every row of X, as a numpy array (N, out)."""
        X = self._check_X(X)
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1):
            raise ValueError(f"batch_size: expected a positive integer or None, got {batch_size!r}")
        N = X.shape[0]
        step = N if batch_size is None else int(batch_size)
        chunks = []
        for start in range(0, N, step):
            part = X[start:start + step]
            ws = self._workspace(part.shape[0])
            staged, _, _ = self._stage(part, None, None, ws)
            chunks.append(self.backend.to_numpy(self._forward(staged, ws)))
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    def evaluate(self, X, y, loss):
        """(loss, accuracy) on (X, y) without updating anything; accuracy is None for mse."""
        loss_id = self._check_loss(loss)
        X = self._check_X(X)
        y = self._check_y(y, loss_id, X.shape[0])
        ws = self._workspace(X.shape[0])
        Xd, Y, _ = self._stage(X, y, loss_id, ws)
        last = self.layers[-1]
        with np.errstate(over="ignore", invalid="ignore"):   # an overflow shows in the loss returned
            self._forward(Xd, ws)
            self.backend.loss_grad(loss_id, last.act, last.alpha, ws.Z[-1], Y, ws.A[-1], ws.G[-1], ws.loss)
        value = float(self.backend.to_numpy(ws.loss)[0])
        return value, losses.accuracy(loss_id, self.backend.to_numpy(ws.A[-1]), self.backend.to_numpy(Y))

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
            on_epoch_end=None, on_batch_end=None):
        """Mini-batch training. Returns a History: per-epoch "loss" (the mean training loss over the epoch's
        batches), "accuracy" where it applies, and "val_loss"/"val_accuracy" with validation_data.
        Shuffling draws from the model's seeded generator, so a run is reproducible and resumable from a
        checkpoint. Device arrays are brought to the host once (rows are gathered there per batch).
        on_epoch_end(epoch, logs) and on_batch_end(batch, n_batches, loss) are optional callbacks.
        A non-finite step stops training, keeps the last good parameters and says so (a RuntimeWarning and
        history.stop_reason)."""
        loss_id = self._check_loss(loss)
        optimizer = self._check_optimizer(optimizer)
        for value, what in ((epochs, "epochs"), (batch_size, "batch_size")):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{what}: expected a positive integer, got {value!r}")
        if not isinstance(shuffle, bool):
            raise TypeError(f"shuffle: expected True or False, got {shuffle!r}")
        for value, what in ((on_epoch_end, "on_epoch_end"), (on_batch_end, "on_batch_end")):
            if value is not None and not callable(value):
                raise TypeError(f"{what}: expected a callable or None, got {type(value).__name__}")
        X = self._host(self._check_X(X))
        y = self._host(self._check_y(y, loss_id, X.shape[0]))
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise ValueError("validation_data: expected a pair (X_val, y_val)")
            Xv = self._check_X(validation_data[0])
            yv = self._check_y(validation_data[1], loss_id, Xv.shape[0])
        N = X.shape[0]
        n_batches = -(-N // batch_size)
        targets = np.eye(self.n_out)[y] if loss_id == losses.SOFTMAX_CE and y.ndim == 1 else y
        history = History()
        for epoch in range(epochs):
            order = self.rng.permutation(N) if shuffle else np.arange(N)
            total_loss = total_correct = 0.0
            for b in range(n_batches):
                idx = order[b * batch_size:(b + 1) * batch_size]
                try:
                    value, prediction = self._train_step(X[idx], y[idx], loss_id, optimizer)
                except FloatingPointError as err:
                    history.stop_reason = f"epoch {epoch}, batch {b}: {err}"
                    warnings.warn(f"fit stopped: {history.stop_reason}", RuntimeWarning, stacklevel=2)
                    return history
                total_loss += value * len(idx)
                # Keras-style running accuracy: each batch's predictions before its update.
                accuracy = losses.accuracy(loss_id, self.backend.to_numpy(prediction), targets[idx])
                if accuracy is not None:
                    total_correct += accuracy * len(idx)
                if on_batch_end is not None:
                    on_batch_end(b, n_batches, value)
            logs = {"loss": total_loss / N}
            if losses.accuracy_applies(loss_id):
                logs["accuracy"] = total_correct / N
            if validation_data is not None:
                logs["val_loss"], val_accuracy = self.evaluate(Xv, yv, loss)
                if val_accuracy is not None:
                    logs["val_accuracy"] = val_accuracy
            for k, v in logs.items():
                history.setdefault(k, []).append(v)
            if on_epoch_end is not None:
                on_epoch_end(epoch, logs)
        return history

    def _host(self, x):
        return x if isinstance(x, np.ndarray) else self.backend.to_numpy(x)

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def save(self, path, extra=None):
        """Checkpoint to `path` (atomic); `extra`: a JSON-able dict returned by gpubp.load as net.extra."""
        from .serialize import save
        save(self, path, extra=extra)
