"""Callbacks for Sequential.fit, Keras-style: `fit(..., callbacks=[EarlyStopping(patience=5)], verbose=1)`.

A callback is told what fit does at a few points, all of them host-side moments fit has anyway:

    on_train_begin(logs)          once, before the first epoch (self.model and self.params are set by then)
    on_epoch_begin(epoch, logs)   before each epoch's first step
    on_batch_end(batch, logs)     at the reads fit makes every `log_every` batches (see below), never otherwise
    on_epoch_end(epoch, logs)     after each epoch, with its metrics ("loss", "accuracy", "val_loss", ...)
    on_train_end(logs)            once, after the last epoch, an early stop or a numerical fault (not after an
                                  exception: then fit re-raises it at once)

`epoch` and `batch` are 0-based indices, as in Keras; every message gpubp prints counts from 1.
To stop training, on_epoch_end returns "stop" or sets `self.model.stop_training = True` (on_batch_end may set
it too: fit then ends the epoch after that batch, records what it ran of it, and stops); a callback can say why
in `self.stop_reason`, which becomes history.stop_reason.

Cost: fit reads the device once per epoch. on_batch_end needs a read each time it is called, so it is called
only every `log_every` batches: when a callback overrides on_batch_end and fit's log_every is None, fit takes
log_every = 1 (a read per step, as the older `on_batch_end=` argument does); pass a larger log_every on a GPU.
"""
import math
import numbers
import os
import sys
import time

STOP = "stop"


class Callback:
    """The base class: every hook does nothing. Subclass it and override the hooks you need."""

    model = None          # the Sequential being fitted (set by fit before on_train_begin)
    params = None         # {"epochs", "initial_epoch", "batches", "rows", "batch_size", "metrics"} from fit
    stop_reason = None    # why this callback stopped training, when it did

    def set_model(self, model, params):
        self.model, self.params = model, params

    def check_metrics(self, metrics):
        """Called by fit before it touches anything, with the names its logs will hold ("loss", "val_loss",
        ...); raise ValueError here for a setting that cannot work (a monitored metric that will not exist)."""

    def on_train_begin(self, logs=None):
        pass

    def on_epoch_begin(self, epoch, logs=None):
        pass

    def on_batch_end(self, batch, logs=None):
        """logs: {"loss": this batch's loss, "epoch_loss": the mean loss of the epoch's batches so far}."""

    def on_epoch_end(self, epoch, logs=None):
        """Return "stop" (or set self.model.stop_training = True) to end training after this epoch."""

    def on_train_end(self, logs=None):
        pass

    def wants_batches(self):
        """True when this callback overrides on_batch_end (fit then reads the device to call it)."""
        return type(self).on_batch_end is not Callback.on_batch_end


class FitArguments(Callback):
    """fit's older arguments, as fit calls them: on_epoch_end(epoch, logs) and on_batch_end(batch, n_batches,
    loss), where loss is that batch's loss. on_epoch_end may return "stop", as Callback.on_epoch_end. (Not
    Keras's LambdaCallback, whose on_batch_end takes (batch, logs): subclass Callback for that.)"""

    def __init__(self, on_epoch_end=None, on_batch_end=None):
        self._epoch_end, self._batch_end = on_epoch_end, on_batch_end

    def wants_batches(self):
        return self._batch_end is not None

    def on_batch_end(self, batch, logs=None):
        if self._batch_end is not None:
            self._batch_end(batch, self.params["batches"], logs["loss"])

    def on_epoch_end(self, epoch, logs=None):
        if self._epoch_end is not None:
            return self._epoch_end(epoch, logs)


def check_callbacks(callbacks):
    """fit's `callbacks` argument as a list of Callback objects, or TypeError saying which item is wrong."""
    if callbacks is None:
        return []
    if isinstance(callbacks, Callback):
        callbacks = [callbacks]
    if not isinstance(callbacks, (list, tuple)):
        raise TypeError(f"callbacks: expected a list of gpubp.callbacks.Callback, got {type(callbacks).__name__}")
    for i, cb in enumerate(callbacks):
        if not isinstance(cb, Callback):
            raise TypeError(f"callbacks[{i}]: expected a gpubp.callbacks.Callback (subclass it), got "
                            f"{type(cb).__name__}")
    return list(callbacks)


class CallbackList:
    """fit's callbacks called in order; the answer of on_epoch_end checked, and the first stop reason kept."""

    def __init__(self, callbacks, model, params):
        self.callbacks = callbacks
        self.model = model
        for cb in callbacks:
            cb.set_model(model, params)

    def on_train_begin(self):
        for cb in self.callbacks:
            cb.on_train_begin({})

    def on_epoch_begin(self, epoch):
        for cb in self.callbacks:
            cb.on_epoch_begin(epoch, {})

    def on_batch_end(self, epoch, batch, logs):
        """Returns the stop reason when a callback set model.stop_training, else None."""
        for cb in self.callbacks:
            was_set = self.model.stop_training
            cb.on_batch_end(batch, dict(logs))
            if self.model.stop_training and not was_set:
                return cb.stop_reason or (f"{_name(cb)} set model.stop_training in epoch {epoch + 1}, batch "
                                          f"{batch + 1}; the epoch ended there")
        return None

    def on_epoch_end(self, epoch, logs):
        """Calls every callback (a stop asked by one still lets the others see the epoch); returns the stop
        reason when one asked to stop, else None."""
        reason = None
        for cb in self.callbacks:
            was_set = self.model.stop_training
            answer = cb.on_epoch_end(epoch, dict(logs))
            if answer is not None and answer != STOP:
                raise ValueError(f"{_name(cb)}.on_epoch_end returned {answer!r}; return 'stop' to stop training, "
                                 "or None")
            if (answer == STOP or (self.model.stop_training and not was_set)) and reason is None:
                reason = cb.stop_reason or f"{_name(cb)} stopped training after epoch {epoch + 1}"
        return reason

    def on_train_end(self, logs):
        for cb in self.callbacks:
            cb.on_train_end(dict(logs))

    def close(self):
        """After an exception: let go of what the callbacks hold open (a progress bar)."""
        for cb in self.callbacks:
            if isinstance(cb, ProgressBar):
                cb.close()


def _name(cb):
    return cb._epoch_end.__qualname__ if isinstance(cb, FitArguments) and cb._epoch_end is not None \
        else type(cb).__name__


# ---- monitoring a metric -------------------------------------------------------------------------------------
class _Monitor:
    """What EarlyStopping and ModelCheckpoint share: which metric, in which direction, by how much."""

    def __init__(self, owner, monitor, mode, min_delta=0.0):
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"{owner} monitor: expected a metric name such as 'val_loss', got {monitor!r}")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"{owner} mode: expected 'auto', 'min' or 'max', got {mode!r}")
        if isinstance(min_delta, bool) or not isinstance(min_delta, numbers.Real) or not math.isfinite(min_delta) \
                or min_delta < 0:
            raise ValueError(f"{owner} min_delta: expected a finite number >= 0, got {min_delta!r}")
        self.owner, self.monitor, self.min_delta = owner, monitor, float(min_delta)
        # Keras's rule: an accuracy grows, anything else (a loss) shrinks.
        self.mode = mode if mode != "auto" else ("max" if "acc" in monitor else "min")

    def check(self, metrics):
        if self.monitor not in metrics:
            hint = "; pass validation_data to fit" if self.monitor.startswith("val_") else ""
            raise ValueError(f"{self.owner} monitor: fit's logs will hold {', '.join(metrics)}, not "
                             f"{self.monitor!r}{hint}")

    def improved(self, value, best):
        """value better than best by more than min_delta (best None: nothing seen yet)."""
        if not math.isfinite(value):
            return False
        if best is None:
            return True
        return value < best - self.min_delta if self.mode == "min" else value > best + self.min_delta


class EarlyStopping(Callback):
    """Stop when `monitor` has not improved by more than `min_delta` for `patience` epochs in a row.

    mode: "min" (a loss), "max" (an accuracy) or "auto" (max when the name holds "acc", else min).
    restore_best_weights: at the end of training (stopped early or not) the parameters of the best epoch are
    put back, bit for bit (the optimizer state is left as it is, as Keras does). After fit, `best`,
    `best_epoch` (0-based) and `stopped_epoch` (0-based, None when it did not stop) say what happened."""

    def __init__(self, monitor="val_loss", patience=0, min_delta=0.0, mode="auto", restore_best_weights=False):
        self._monitor = _Monitor("EarlyStopping", monitor, mode, min_delta)
        if isinstance(patience, bool) or not isinstance(patience, numbers.Integral) or patience < 0:
            raise ValueError(f"EarlyStopping patience: expected an integer >= 0, got {patience!r}")
        if not isinstance(restore_best_weights, bool):
            raise TypeError(f"EarlyStopping restore_best_weights: expected True or False, got {restore_best_weights!r}")
        self.monitor, self.mode, self.min_delta = monitor, self._monitor.mode, self._monitor.min_delta
        self.patience, self.restore_best_weights = int(patience), restore_best_weights

    def check_metrics(self, metrics):
        self._monitor.check(metrics)

    def on_train_begin(self, logs=None):
        self.best, self.best_epoch, self.best_params = None, None, None
        self.wait, self.stopped_epoch, self.stop_reason = 0, None, None

    def on_epoch_end(self, epoch, logs=None):
        value = logs[self.monitor]
        if self._monitor.improved(value, self.best):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:
                self.best_params = self.model.get_params()
            return None
        self.wait += 1
        if self.wait >= self.patience:      # Keras's count: `patience` epochs without improvement (0 acts as 1)
            self.stopped_epoch = epoch
            self.stop_reason = (f"early stopping: {self.monitor} did not improve on {self.best:.6g} (epoch "
                                f"{self.best_epoch + 1}) for {self.wait} epochs" if self.best is not None else
                                f"early stopping: {self.monitor} was never finite in {self.wait} epochs")
            return STOP
        return None

    def on_train_end(self, logs=None):
        if self.restore_best_weights and self.best_params is not None:
            self.model.set_params(self.best_params)


class ModelCheckpoint(Callback):
    """Save the model (gpubp's checkpoint, written atomically: a temporary file, then a rename) after each
    epoch, or with save_best_only=True only when `monitor` improved. `path` may hold format fields:
    "model-{epoch:03d}-{val_loss:.3f}.npz" (epoch counted from 1, and any metric of the epoch's logs).
    `extra`: JSON-able metadata saved with it (Sequential.save)."""

    def __init__(self, path, monitor="val_loss", save_best_only=False, mode="auto", extra=None):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"ModelCheckpoint path: expected a file path, got {type(path).__name__}")
        if not isinstance(save_best_only, bool):
            raise TypeError(f"ModelCheckpoint save_best_only: expected True or False, got {save_best_only!r}")
        folder = os.path.dirname(os.path.abspath(os.fspath(path)))
        if not os.path.isdir(folder):
            raise ValueError(f"ModelCheckpoint path: the folder {folder} does not exist")
        self._monitor = _Monitor("ModelCheckpoint", monitor, mode)
        self.path, self.monitor, self.save_best_only, self.extra = os.fspath(path), monitor, save_best_only, extra
        self.best = None
        self.saved = []       # the paths written, in order

    def check_metrics(self, metrics):
        if self.save_best_only:
            self._monitor.check(metrics)
        try:
            self.path.format(epoch=1, **{name: 0.0 for name in metrics})
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"ModelCheckpoint path {self.path!r}: its format fields can use epoch and "
                             f"{', '.join(metrics)} ({type(exc).__name__}: {exc})") from None

    def on_epoch_end(self, epoch, logs=None):
        if self.save_best_only:
            value = logs[self.monitor]
            if not self._monitor.improved(value, self.best):
                return None
            self.best = value
        path = self.path.format(epoch=epoch + 1, **logs)
        self.model.save(path, extra=self.extra)
        self.saved.append(path)
        return None


# ---- progress --------------------------------------------------------------------------------------------------
def progress_log_every(n_batches, updates=20):
    """Batches between progress updates: about `updates` per epoch, and never every batch (each update is a
    read of the device, and a step is far shorter than a read on a GPU); the epoch's end is read anyway."""
    return max(2, -(-n_batches // updates))


class ProgressBar(Callback):
    """fit(verbose=1): a tqdm bar on stderr per epoch (rows done, samples/s, the epoch's mean loss so far),
    updated at fit's reads only (every log_every batches), left on screen with the epoch's metrics.
    fit(verbose=2): no bar, one line per epoch on stderr."""

    def __init__(self, bar=True, file=None):
        self.bar_wanted, self.file, self.bar = bar, file, None

    def wants_batches(self):
        return self.bar_wanted

    def on_epoch_begin(self, epoch, logs=None):
        self.started, self.seen = time.perf_counter(), 0
        if self.bar_wanted:
            from tqdm import tqdm
            self.bar = tqdm(total=self.params["rows"], desc=f"epoch {epoch + 1}/{self.params['epochs']}",
                            unit="sample", unit_scale=True, file=self.file or sys.stderr, dynamic_ncols=True)

    def on_batch_end(self, batch, logs=None):
        if self.bar is None:
            return
        done = min((batch + 1) * self.params["batch_size"], self.params["rows"])
        self.bar.set_postfix(loss=f"{logs['epoch_loss']:.4f}", refresh=False)
        self.bar.update(done - self.seen)
        self.seen = done

    def on_epoch_end(self, epoch, logs=None):
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in logs.items())
        if self.bar is not None:
            self.bar.set_postfix_str(metrics, refresh=False)
            self.bar.update(self.params["rows"] - self.seen)
            self.close()
        else:
            rate = self.params["rows"] / max(time.perf_counter() - self.started, 1e-9)
            print(f"epoch {epoch + 1}/{self.params['epochs']}  {metrics}  {rate:,.0f} samples/s",
                  file=self.file or sys.stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
