"""The `gpubp` command: train / predict / info / bench.

    gpubp train --data breast_cancer --epochs 30 --save model.npz --plot curves.png
    gpubp train --data breast_cancer --epochs 60 --resume model.npz      # continues to epoch 60
    gpubp predict model.npz --data new.csv --out preds.csv
    gpubp export model.npz --onnx model.onnx [--probabilities]              # for ONNX Runtime and friends
    gpubp info
    gpubp bench [ARGS...]                                                 # the suite in bench/ (source checkout)
    mpiexec -n 2 gpubp train --data digits --save model.npz              # data-parallel: --batch-size per rank

Bad input ends with one line on stderr, `gpubp: error: ...`, and exit status 2; set GPUBP_TRACEBACK=1 to see the
traceback instead. A checkpoint keeps the preprocessing (feature mean/std, class labels, target scaling) in its
`extra` metadata, so predict applies exactly what train fitted.
"""
import contextlib
import csv
import importlib.metadata
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import click
import numpy as np

import gpubp
from gpubp import data as gdata
from gpubp.activations import NAMES as ACTIVATIONS
from gpubp.backends import BACKENDS, BackendUnavailable
from gpubp.callbacks import Callback, EarlyStopping, progress_log_every
from gpubp.precision import NOTES as PRECISION_NOTES
from gpubp.precision import PRECISIONS

EXIT_BAD_INPUT = 2
EXIT_STOPPED = 1      # training stopped on a non-finite step (the last good parameters are saved)


class CliError(Exception):
    """Bad input found by the command line itself: printed as one line, exit status 2."""


def _fail_line(message):
    # One line, whatever the message holds: the shell user greps and reads it.
    return "gpubp: error: " + " ".join(str(message).split())


# ---- train --------------------------------------------------------------------------------------------------------
def parse_layers(text):
    """'64,64' -> [64, 64]; '' or 'none' -> [] (no hidden layer)."""
    if text.strip().lower() in ("", "none"):
        return []
    sizes = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise CliError(f"--layers: expected comma-separated positive integers like 64,64, got {text!r}")
        sizes.append(int(part))
    return sizes


def plan_architecture(n_in, hidden, activation, n_out, loss):
    """[(n_in, n_out, activation)] per layer: hidden layers with `activation`, then an output layer sized from
    the data whose activation is the one the loss's fused form needs: sigmoid for bce, identity for softmax_ce
    (the softmax is part of the loss) and for mse."""
    sizes = [n_in] + hidden + [n_out]
    acts = [activation] * len(hidden) + ["sigmoid" if loss == "bce" else "identity"]
    return [(a, b, act) for a, b, act in zip(sizes[:-1], sizes[1:], acts)]


def _architecture(net):
    return [(layer.n_in, layer.n_out, layer.activation) for layer in net.layers]


def _describe(arch):
    return " -> ".join([str(arch[0][0])] + [f"{n_out} {act}" for _, n_out, act in arch])


class EpochReporter(Callback):
    """On a terminal, a tqdm bar (on stderr) while an epoch runs: rows done, samples/s, the epoch's loss so far. Then,
    on a terminal or not, one plain line per epoch on stdout with every metric and samples/s, so a log or CI output
    reads the same as the screen and stays in order with the summary. Epochs are counted from 1. Under mpiexec:
    rank 0's lines only (echo), and no bar."""

    def __init__(self, n_train, batch_size, epochs, echo=click.echo, bar=True):
        self.n_train, self.batch_size, self.epochs, self.echo = n_train, batch_size, epochs, echo
        self.tty = bar and sys.stderr.isatty()
        self.bar = None

    def wants_batches(self):
        return self.tty

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()
        self.seen = 0
        if self.tty:
            from tqdm import tqdm
            # A terminal that reports 0 columns (some ptys) would make tqdm print an empty bar: use 80 there.
            width = shutil.get_terminal_size((0, 0)).columns
            self.bar = tqdm(total=self.n_train, desc=f"epoch {epoch + 1}/{self.epochs}", unit="sample",
                            unit_scale=True, leave=False, dynamic_ncols=width > 0, ncols=None if width else 80)

    @property
    def log_every(self):
        """Batches between progress-bar updates (on a terminal): about 20 an epoch, never every batch. Each update
        reads the device once (fit's loop otherwise reads it once per epoch)."""
        return progress_log_every(-(-self.n_train // self.batch_size))

    def on_batch_end(self, batch, logs=None):
        done = min((batch + 1) * self.batch_size, self.n_train)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{logs['epoch_loss']:.4f}", refresh=False)
            self.bar.update(done - self.seen)
        self.seen = done

    def on_epoch_end(self, epoch, logs=None):
        self.close()
        rate = self.n_train / max(time.perf_counter() - self.started, 1e-9)
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in logs.items())
        self.echo(f"epoch {epoch + 1}/{self.epochs}  {metrics}  {rate:,.0f} samples/s")

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class RunRecorder(Callback):
    """The command's own bookkeeping after each epoch: the history kept in the checkpoint, the epochs done, and a
    checkpoint every `every` epochs."""

    def __init__(self, history, epochs_done, every, write):
        self.history, self.epochs_done, self.every, self.write = history, epochs_done, every, write

    def on_epoch_end(self, epoch, logs=None):
        for k, v in logs.items():
            self.history.setdefault(k, []).append(v)
        self.epochs_done = epoch + 1
        if self.every is not None and self.epochs_done % self.every == 0 and self.epochs_done < self.params["epochs"]:
            self.write(self.epochs_done)


def save_curves(history, path, title):
    """Loss (and accuracy, where it applies) per epoch, train and validation, as a PNG. Uses matplotlib's Figure
    directly, not pyplot: no GUI backend is chosen or needed, and no global state is touched."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise CliError("--plot needs matplotlib: pip install 'gpubp[cli]'") from None
    panels = [("loss", "loss")] + ([("accuracy", "accuracy")] if "accuracy" in history else [])
    fig = Figure(figsize=(5.5 * len(panels), 4.2), dpi=110, layout="constrained")
    epochs = np.arange(1, len(history["loss"]) + 1)
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.plot(epochs, history[key], marker=".", label="train")
        if "val_" + key in history:
            ax.plot(epochs, history["val_" + key], marker=".", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if key == "loss":
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path)


def _prepare(dataset, loss, val_split, seed, saved=None):
    """Split (seeded; stratified for class labels), fit the preprocessing on the training rows (or take it from
    a checkpoint), and encode the targets. Returns (X_train, y_train, X_held, y_held, standardizer, targets)."""
    y = dataset.y
    if y is None:
        raise CliError(f"{dataset.source}: has no targets to train on")
    train, held = gdata.split_indices(y, val_split, seed, stratify=y.ndim == 1 and y.dtype.kind in "iuU")
    if saved is not None:
        scaler = gdata.Standardizer.from_dict(saved["features"])
        targets = gdata.Targets.from_dict(saved["targets"])
    else:
        scaler = gdata.Standardizer.fit(dataset.X[train])
        loss = loss or gdata.infer_loss(y)
        # Class labels from every row (a held-out row must not bring an unknown class); target scaling for mse
        # from the training rows only, like the features.
        targets = gdata.Targets.fit(y[train] if loss == "mse" else y, loss)
    X = scaler.transform(dataset.X)
    # Class labels go to fit as they are (the model keeps them as its classes and encodes them); probabilities
    # and regression targets are encoded here.
    y = targets.encode(y) if targets.classes is None else y
    return X[train], y[train], X[held], y[held], scaler, targets


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(gpubp.__version__, prog_name="gpubp")
def cli():
    """gpubp: backpropagation for multilayer perceptrons, on CUDA kernels or NumPy."""


@cli.command()
@click.option("--data", "data_spec", required=True, metavar="DATA",
              help=f"A bundled set ({', '.join(gdata.BUNDLED)}), or a .csv (header, numeric columns) or .npz "
                   "(arrays X, y) file.")
@click.option("--target", default=None, metavar="COLUMN", help="The CSV column to predict [default: the last].")
@click.option("--layers", default=None, help="Hidden layer sizes, comma-separated [default: 64,64].")
@click.option("--activation", type=click.Choice(sorted(ACTIVATIONS)), default=None,
              help="The hidden layers' activation [default: relu].")
@click.option("--loss", type=click.Choice(["bce", "mse", "softmax_ce"]), default=None,
              help="[default: from the target: >2 integer classes softmax_ce, 2 classes bce, floats mse]")
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True,
              help="Total epochs; with --resume, training continues up to this number.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default=None, help="[default: sgd]")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Learning rate [default: 0.05 for sgd, 0.001 for adam].")
@click.option("--momentum", type=click.FloatRange(min=0), default=None, help="SGD momentum [default: 0.9].")
@click.option("--backend", type=click.Choice(["auto", *BACKENDS]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default=None, help="[default: float32]")
@click.option("--precision", type=click.Choice(list(PRECISIONS)), default=None,
              help="GEMM operand precision (float32 models): tf32, or bf16/fp16 with 16-bit activations; fp16 "
                   "scales the loss dynamically [default: fp32].")
@click.option("--fused", type=click.Choice(["auto", "on", "off"]), default=None,
              help="The fully fused MLP (bf16/fp16, hidden widths up to 128, zero-padded to 16/32/48/64/128): auto "
                   "takes it where the model and backend allow, on requires it, off never [default: auto].")
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="Seeds the split, the initialisation, the shuffling and the synthetic sets [default: 0].")
@click.option("--val-split", type=float, default=None,
              help="Fraction of rows held out (seeded, stratified for classes) for validation and the final score "
                   "[default: 0.2].")
@click.option("--save", "save_path", type=click.Path(dir_okay=False), default=None,
              help="Write the checkpoint here (atomically) at the end, and every --checkpoint-every epochs.")
@click.option("--resume", "resume_path", type=click.Path(dir_okay=False), default=None,
              help="Continue from this checkpoint, up to --epochs in all: its network, optimizer and state, "
                   "preprocessing, split and epoch count are the checkpoint's.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=None, metavar="N",
              help="Also write the checkpoint every N epochs, so an interruption loses at most N epochs.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Save loss/accuracy curves (train and validation) as a PNG.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=None,
              help="L2 weight decay of the optimizer (torch's rule for SGD and Adam) [default: 0].")
@click.option("--schedule", type=click.Choice(["cosine", "step", "plateau"]), default=None,
              help="Learning-rate schedule, per epoch: cosine (to 0 at --epochs, after --warmup), step (x0.1 every "
                   "third of --epochs), plateau (x0.5 when val_loss has not improved for 5 epochs) [default: none].")
@click.option("--warmup", type=click.IntRange(min=1), default=None, metavar="EPOCHS",
              help="With --schedule cosine: epochs of linear warm-up to --lr first.")
@click.option("--early-stopping", type=click.IntRange(min=1), default=None, metavar="PATIENCE",
              help="Stop when val_loss has not improved for PATIENCE epochs, and keep the best epoch's parameters.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for the numpy backend's BLAS (threadpoolctl) [default: all cores]; on a machine "
                   "shared with other jobs, 1 or 2 gives steadier times.")
def train(data_spec, target, layers, activation, loss, epochs, batch_size, optimizer, lr, momentum, backend, dtype,
          precision, fused, seed, val_split, save_path, resume_path, checkpoint_every, plot_path, weight_decay, schedule,
          warmup, early_stopping, threads):
    """Train an MLP on DATA; print per-epoch progress and a held-out score. Under mpiexec, data-parallel: each
    rank trains on --batch-size rows of every step (the step's batch is --batch-size × ranks); rank 0 prints and
    writes the checkpoint; --resume reads it on every rank (a path every rank can read)."""
    # Under mpiexec: this rank's place (and GPU); alone: size 1, and everything below runs as it always did.
    transport = "auto" if backend == "auto" else gpubp.distributed.TRANSPORT_FOR_BACKEND[backend]
    comm = gpubp.distributed.init(backend=transport)
    root = comm.rank == 0
    say = click.echo if root else _quiet
    save_path = save_path or resume_path            # a resumed run keeps writing to its checkpoint by default
    if checkpoint_every is not None and save_path is None:
        raise CliError("--checkpoint-every: needs --save PATH (or --resume PATH) to write to")
    if warmup is not None and schedule != "cosine":
        raise CliError("--warmup: applies to --schedule cosine")
    if warmup is not None and warmup >= epochs:
        raise CliError(f"--warmup {warmup}: must be fewer than --epochs ({epochs})")
    for path, what in ((save_path, "--save"), (plot_path, "--plot")):
        if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise CliError(f"{what}: the folder of {path} does not exist")
    hidden = parse_layers(layers) if layers is not None else None
    thread_limit = _thread_limit(threads)

    saved = None
    if resume_path is not None:
        net = gpubp.load(resume_path, backend=backend)
        saved = _cli_meta(net, resume_path)
        _check_resume_options(net, resume_path, optimizer, lr, momentum, dtype, weight_decay, schedule)
        if precision is not None and precision != (net.precision or "fp32"):
            raise CliError(f"--resume: {resume_path} was trained with precision {net.precision}, not --precision "
                           f"{precision}")
        if fused is not None and _FUSED_SETTINGS[fused] != net.fused_setting:
            raise CliError(f"--resume: {resume_path} was trained with fused={net.fused_setting!r}, not --fused {fused}")
        target = target if target is not None else saved["target"]      # the same column as the first run
        for option, value, key in (("--seed", seed, "seed"), ("--val-split", val_split, "val_split")):
            if value is not None and value != saved[key]:
                raise CliError(f"--resume: {resume_path} was trained with {option} {saved[key]}, not {value}")
        seed, val_split = saved["seed"], saved["val_split"]              # the same data, split and shuffling
        # Options not given take the checkpoint's values, so `--resume` alone continues the same run.
        if hidden is None:
            hidden = [layer.n_out for layer in net.layers[:-1]]
        if activation is None and len(net.layers) > 1:
            activation = net.layers[0].activation
    hidden = [64, 64] if hidden is None else hidden
    seed = 0 if seed is None else seed
    val_split = 0.2 if val_split is None else val_split
    activation = activation or "relu"

    dataset = gdata.load_dataset(data_spec, target=target, seed=seed)
    if saved is not None and dataset.X.shape[1] != len(saved["features"]["mean"]):
        raise CliError(f"--resume: {resume_path} was trained on {len(saved['features']['mean'])} features, "
                       f"{dataset.source} has {dataset.X.shape[1]}")
    X_train, y_train, X_held, y_held, scaler, targets = _prepare(dataset, loss, val_split, seed, saved)
    if loss is not None and loss != targets.loss:
        raise CliError(f"--loss {loss}: the checkpoint {resume_path} was trained with {targets.loss}")
    wanted = plan_architecture(X_train.shape[1], hidden, activation, targets.n_out, targets.loss)
    if saved is None:
        if precision not in (None, "fp32") and dtype == "float64":
            raise CliError(f"--precision {precision}: needs --dtype float32 (operands are rounded from float32), "
                           "not --dtype float64")
        try:
            net = gpubp.Sequential(*[gpubp.Dense(*layer) for layer in wanted], backend=backend,
                                   dtype=dtype or "float32", seed=seed, precision=precision,
                                   fused=_FUSED_SETTINGS[fused or "auto"])
        except ValueError as exc:   # a precision the backend does not implement, or --fused on that cannot be
            option = f"--fused {fused}" if "fused=" in str(exc) else f"--precision {precision}"
            raise CliError(f"{option}: {exc}") from None
        if optimizer == "adam" and momentum is not None:
            raise CliError("--momentum: applies to --optimizer sgd (Adam keeps its own moment estimates)")
        rate = lr or (1e-3 if optimizer == "adam" else 0.05)
        rate = _schedule(schedule, rate, epochs, warmup) or rate
        opt = (gpubp.Adam(net, lr=rate, weight_decay=weight_decay or 0.0) if optimizer == "adam"
               else gpubp.SGD(net, lr=rate, momentum=0.9 if momentum is None else momentum,
                              weight_decay=weight_decay or 0.0))
        epochs_done, history = 0, {}
    else:
        if _architecture(net) != wanted:
            raise CliError(f"--resume: {resume_path} holds the network {_describe(_architecture(net))}, but "
                           f"--data/--layers/--activation give {_describe(wanted)}")
        opt = net.optimizer
        epochs_done, history = saved["epochs_done"], {k: list(v) for k, v in saved["history"].items()}
        if epochs_done >= epochs:
            say(f"{resume_path}: already trained for {epochs_done} epochs (--epochs {epochs}); nothing to do")
            return
    if targets.classes is not None and net.classes is None:
        net.classes = targets.classes          # every class of the data, though a training split might miss one
    first_epoch = epochs_done

    def checkpoint(done):
        meta = {"data": data_spec, "target": target, "target_name": dataset.target_name, "seed": seed,
                "val_split": val_split,
                "feature_names": dataset.feature_names, "features": scaler.to_dict(), "targets": targets.to_dict(),
                "epochs_done": done, "history": history}
        if root:   # one writer; the others hold the same model
            net.save(save_path, extra={"gpubp_cli": meta})

    say(f"{dataset.source}: {len(X_train)} training and {len(X_held)} held-out rows, {X_train.shape[1]} "
        f"features; loss {targets.loss}; network {_describe(_architecture(net))}; {opt!r}; backend "
        f"{net.backend.name}, {net.dtype.name}" + (f", precision {net.precision}" if net.precision else "")
        + (", fused MLP" if net.fused else "")
        + (f"; resuming at epoch {epochs_done + 1}" if saved else "")
        + (f"; {comm.size} ranks, global batch {batch_size * comm.size}" if comm.size > 1 else ""))
    reporter = EpochReporter(len(X_train), batch_size, epochs, echo=say, bar=comm.size == 1)
    recorder = RunRecorder(history, epochs_done, checkpoint_every, checkpoint)
    callbacks = [reporter, recorder]
    if early_stopping is not None:
        callbacks.append(EarlyStopping("val_loss", patience=early_stopping, restore_best_weights=True))
    started = time.perf_counter()
    try:
        with warnings.catch_warnings(), thread_limit:
            # fit warns when a non-finite step stops it; here that becomes the run's stop reason, said once.
            warnings.simplefilter("ignore", RuntimeWarning)
            result = net.fit(X_train, y_train, loss=targets.loss, optimizer=opt, epochs=epochs,
                             initial_epoch=epochs_done, batch_size=batch_size, validation_data=(X_held, y_held),
                             callbacks=callbacks, log_every=reporter.log_every if reporter.tty else None,
                             comm=comm)
    finally:
        reporter.close()
    elapsed = time.perf_counter() - started
    epochs_done = recorder.epochs_done

    if save_path is not None:
        checkpoint(epochs_done)
    if plot_path is not None and history and root:
        save_curves(history, plot_path, f"gpubp on {dataset.source}: {_describe(_architecture(net))}")
    with warnings.catch_warnings():
        # After a stopped run the outputs may overflow: the summary shows inf, and the stop reason says why.
        warnings.simplefilter("ignore", RuntimeWarning)
        held_loss, held_accuracy = net.evaluate(X_held, y_held, targets.loss)
        score = (f"held-out accuracy {held_accuracy:.4f}" if held_accuracy is not None
                 else f"held-out R² {_r2(targets.decode(net.predict(X_held)), targets.decode(y_held)):.4f}")
    ran = epochs_done - first_epoch
    span = (f"epochs {first_epoch + 1}-{epochs_done}" if ran > 1 else f"epoch {epochs_done}" if ran else "no epoch")
    say(f"{score}, loss {held_loss:.4f} ({len(X_held)} rows); {epochs_done} of {epochs} epochs done; "
        f"this run: {span}, {elapsed:.2f} s" + (f"; saved {save_path}" if save_path else "")
        + (f"; curves {plot_path}" if plot_path and history else ""))
    if result.fault is not None:
        say(f"gpubp: training stopped early: {result.stop_reason}", err=True)
        sys.exit(EXIT_STOPPED)
    if result.stop_reason is not None:           # --early-stopping: the best epoch's parameters were put back
        say(f"stopped after epoch {epochs_done}: {result.stop_reason}; the parameters of that best epoch are "
                   "kept")


def _schedule(name, lr, epochs, warmup):
    """The schedule --schedule names, per epoch, starting from the learning rate lr; None for none."""
    if name == "cosine":
        return gpubp.schedules.Cosine(lr, total=epochs, warmup=warmup or 0)
    if name == "step":
        return gpubp.schedules.StepDecay(lr, step_size=max(1, epochs // 3), gamma=0.1)
    if name == "plateau":
        return gpubp.schedules.ReduceOnPlateau(lr, monitor="val_loss", factor=0.5, patience=5)
    return None


def _thread_limit(threads):
    """A context that limits the BLAS threads to `threads` (threadpoolctl), or does nothing when None."""
    if threads is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        raise CliError("--threads: needs threadpoolctl: pip install 'gpubp[cli]'") from None
    return threadpool_limits(limits=threads)


def _quiet(*args, **kwargs):
    """click.echo on ranks other than 0: they train the same model, rank 0 speaks for all."""


_META_KEYS = ("data", "target", "seed", "val_split", "feature_names", "features", "targets", "epochs_done", "history")


def _cli_meta(net, path):
    """What `gpubp train` kept in the checkpoint's extra metadata, checked for the keys the commands read."""
    meta = net.extra.get("gpubp_cli")
    if not isinstance(meta, dict):
        raise CliError(f"{path}: was not written by `gpubp train` (it holds no preprocessing metadata to apply)")
    missing = [key for key in _META_KEYS if key not in meta]
    if missing:
        raise CliError(f"{path}: its gpubp train metadata lacks {', '.join(missing)}; written by another version?")
    return meta


def _check_resume_options(net, path, optimizer, lr, momentum, dtype, weight_decay=None, schedule=None):
    """A resumed run continues with the checkpoint's optimizer, its state and its schedule: asking for other
    settings is an error, not something to ignore quietly."""
    opt = net.optimizer
    if opt is None:
        raise CliError(f"--resume: {path} holds no optimizer state to continue from")
    if optimizer is not None and type(opt).__name__.lower() != optimizer:
        raise CliError(f"--resume: {path} was trained with {type(opt).__name__}, not --optimizer {optimizer}")
    if lr is not None or momentum is not None or weight_decay is not None or schedule is not None:
        raise CliError(f"--resume: continues with the checkpoint's optimizer settings ({opt!r}); drop --lr, "
                       "--momentum, --weight-decay and --schedule, or start a new run without --resume")
    if dtype is not None and dtype != net.dtype.name:
        raise CliError(f"--resume: {path} holds {net.dtype.name} parameters, not --dtype {dtype}")


def _r2(predicted, actual):
    """Coefficient of determination over all outputs: 1 is perfect, 0 is predicting the mean."""
    residual = np.sum((actual - predicted) ** 2)
    total = np.sum((actual - actual.mean(axis=0)) ** 2)
    return 1.0 - residual / total if total > 0 else float("nan")


# ---- predict ------------------------------------------------------------------------------------------------------
@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", "data_spec", required=True, metavar="FILE",
              help="A .csv (the training columns by name; a target column, if present, is used for the score only), "
                   "an .npz (array X, and y for a score), or a bundled set's name.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Write the predictions CSV here [default: standard output].")
@click.option("--proba", is_flag=True, default=False,
              help="Write each class's probability (one column per class) instead of the predicted label.")
@click.option("--backend", type=click.Choice(["auto", *BACKENDS]), default="auto", show_default=True)
def predict(model, data_spec, out_path, proba, backend):
    """Predict with a checkpoint written by `gpubp train`: one CSV row per input row (class labels for
    classifiers, or with --proba their probabilities; values for regression), with the training run's
    preprocessing applied. When the data has targets, the accuracy (R² for regression) goes to stderr."""
    net = gpubp.load(model, backend=backend)
    saved = _cli_meta(net, model)
    targets = gdata.Targets.from_dict(saved["targets"])
    if proba and targets.loss == "mse":
        raise CliError(f"--proba: {model} is a regression (loss mse); it has no probabilities")
    X, y = _features_for(data_spec, saved, net.n_in)
    outputs = net.predict(gdata.Standardizer.from_dict(saved["features"]).transform(X))
    answers = targets.decode(outputs)
    if proba:
        table, columns = _probabilities(outputs, targets)
    else:
        table = answers.reshape(len(answers), -1)
        columns = ["prediction"] if table.shape[1] == 1 else [f"prediction_{j}" for j in range(table.shape[1])]
    out = open(out_path, "w", newline="") if out_path else sys.stdout
    try:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for row in table:
            writer.writerow([_cell(v) for v in row])
    finally:
        if out_path:
            out.close()
    if out_path:
        click.echo(f"{out_path}: {len(table)} {'probabilities' if proba else 'predictions'}", err=True)
    if y is not None:
        click.echo(_score_line(answers, y, targets, data_spec), err=True)


def _probabilities(outputs, targets):
    """(rows, column names) of class probabilities: softmax_ce, the softmax of the outputs, one column per class;
    bce with two class labels, P(first) and P(second); bce on probabilities, the output as it is."""
    if targets.loss == "softmax_ce":
        shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True), [f"proba_{c}" for c in targets.classes]
    if targets.classes is not None:
        return np.column_stack([1 - outputs[:, 0], outputs[:, 0]]), [f"proba_{c}" for c in targets.classes]
    return outputs, ["proba"] if outputs.shape[1] == 1 else [f"proba_{j}" for j in range(outputs.shape[1])]


def _score_line(answers, y, targets, source):
    """The accuracy (classes) or R² (values) of the answers against the data's own targets."""
    if targets.loss == "mse":
        return f"{source}: R² {_r2(answers, y.reshape(answers.shape).astype(np.float64)):.4f} on {len(y)} rows"
    if targets.classes is None:                     # bce on probabilities: thresholded at 0.5 both sides
        return f"{source}: accuracy {np.mean((answers > 0.5) == (y.reshape(answers.shape) > 0.5)):.4f} on {len(y)} rows"
    y = y.reshape(answers.shape)
    if (answers.dtype.kind == "U") != (y.dtype.kind == "U"):      # labels read back as text, or the other way
        answers, y = answers.astype(str), y.astype(str)
    return f"{source}: accuracy {np.mean(answers == y):.4f} on {len(y)} labelled rows"


def _cell(value):
    value = value.item() if hasattr(value, "item") else value
    return str(value) if isinstance(value, (int, str)) else f"{value:.9g}"


def _features_for(data_spec, saved, n_in):
    """(X, y): the feature matrix of `data_spec`, columns in the training order (a CSV's by name where it has them
    all, else by position when the count matches), and its targets where it has them (else None)."""
    names = saved["feature_names"]
    if str(data_spec).lower().endswith(".csv"):
        # the training run's target column, named or (its default) the last one: used for the score only
        target = saved.get("target") or saved.get("target_name")
        dataset = gdata.read_csv(data_spec, target=target, require_target=False)
        if all(name in dataset.feature_names for name in names):
            return dataset.X[:, [dataset.feature_names.index(name) for name in names]], dataset.y
        if dataset.X.shape[1] != n_in:
            missing = [name for name in names if name not in dataset.feature_names]
            raise CliError(f"{data_spec}: the model needs the columns {', '.join(missing[:5])}"
                           f"{'...' if len(missing) > 5 else ''} (or {n_in} columns in training order), "
                           f"got {', '.join(dataset.feature_names)}")
        return dataset.X, dataset.y
    dataset = gdata.load_dataset(data_spec, require_target=False)
    if dataset.X.shape[1] != n_in:
        raise CliError(f"{data_spec}: the model needs {n_in} feature columns, got {dataset.X.shape[1]}")
    return dataset.X, dataset.y


# ---- export -------------------------------------------------------------------------------------------------------
@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False), required=True,
              help="Write the network as an ONNX model here.")
@click.option("--opset", type=int, default=gpubp.export.ONNX_OPSET, show_default=True, help="ONNX opset.")
@click.option("--probabilities", is_flag=True,
              help="End the graph in a softmax (or sigmoid) so that it outputs class probabilities.")
def export(model, onnx_path, opset, probabilities):
    """Export a checkpoint as an ONNX model (input X: (N, features), output Y or probabilities: (N, outputs)).
    A checkpoint written by `gpubp train` has its preprocessing built into the graph: the graph takes the raw
    feature columns in training order and gives regression values in the target's units."""
    net = gpubp.load(model, backend="numpy")
    input_scaling = output_scaling = None
    about = "raw network outputs"
    if "gpubp_cli" in net.extra:
        saved = _cli_meta(net, model)
        features = gdata.Standardizer.from_dict(saved["features"])
        targets = gdata.Targets.from_dict(saved["targets"])
        input_scaling = (features.mean, features.std)
        if targets.loss == "mse" and not probabilities:
            output_scaling = (targets.mean, targets.std)
        if targets.loss == "softmax_ce":
            output = f"columns are classes {targets.classes}" + ("" if probabilities else " (logits)")
        elif targets.loss == "bce":
            output = f"probability of class {targets.classes[1]!r}" if targets.classes else "probabilities"
        else:
            output = "values in the target's units"
        about = f"features {', '.join(map(str, saved['feature_names']))} standardised inside; {output}"
    gpubp.export.to_onnx(net, onnx_path, opset=opset, probabilities=probabilities, input_scaling=input_scaling,
                         output_scaling=output_scaling)
    click.echo(f"{onnx_path}: ONNX model of {_describe(_architecture(net))}, {net.dtype.name}; {about}")


# ---- info ---------------------------------------------------------------------------------------------------------
@cli.command()
def info():
    """The backends usable here (and why the others are not), the GPU, and versions."""
    click.echo(f"gpubp {gpubp.__version__}")
    click.echo(f"python {platform.python_version()} ({sys.executable})")
    for package in ("numpy", "numba", "numba-cuda", "cupy-cuda12x", "cupy-cuda13x", "scikit-learn", "matplotlib"):
        try:
            click.echo(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            if not package.startswith("cupy"):
                click.echo(f"{package} not installed")
    click.echo("backends:")
    for name, (usable, reason) in gpubp.availability().items():
        click.echo(f"  {name:6} {'yes' if usable else 'no '}  {reason}")
    click.echo(f"  auto -> {gpubp.get_backend('auto').name}")
    click.echo("precisions (Sequential(precision=...), --precision):")
    for name, how in PRECISION_NOTES.items():
        click.echo(f"  {name:6} {how}")
    for name, (usable, _) in gpubp.availability().items():
        if usable:
            click.echo(f"  on {name}: {' '.join(gpubp.get_backend(name).PRECISIONS)}")
    click.echo("fused MLP (Sequential(fused=...), --fused; bf16/fp16, gpubp/fused.py says which models):")
    for name, (usable, _) in gpubp.availability().items():
        if usable:
            click.echo(f"  {name:6} {'yes' if gpubp.get_backend(name).FUSED else 'no (the per-layer kernels run)'}")
    click.echo("gpu: " + _gpu_line())


_FUSED_SETTINGS = {"auto": "auto", "on": True, "off": False}   # --fused -> Sequential(fused=...)


def _gpu_line():
    """The GPU(s) through cupy where it imports and sees a device; every failure is a reason, not a crash."""
    try:
        import cupy
    except Exception as exc:          # not installed, or a broken CUDA install that fails at import
        return f"none found (cupy cannot be imported: {type(exc).__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
        lines = []
        for i in range(count):
            props = cupy.cuda.runtime.getDeviceProperties(i)
            name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            with cupy.cuda.Device(i):
                free, total = cupy.cuda.runtime.memGetInfo()
            lines.append(f"[{i}] {name}, compute capability {props['major']}.{props['minor']}, "
                         f"{total / 2**30:.1f} GiB memory ({free / 2**30:.1f} GiB free)")
        if not lines:
            return "none found (cupy sees no CUDA device)"
        runtime, driver = cupy.cuda.runtime.runtimeGetVersion(), cupy.cuda.runtime.driverGetVersion()
        lines.append(f"CUDA runtime {runtime // 1000}.{runtime % 1000 // 10}, driver supports "
                     f"{driver // 1000}.{driver % 1000 // 10}")
        return "; ".join(lines)
    except Exception as exc:
        return f"none found ({type(exc).__name__}: {exc})"


# ---- bench --------------------------------------------------------------------------------------------------------
@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True}, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args):
    """Run the benchmark suite (bench/ in a source checkout); ARGS go to it unchanged (try: gpubp bench --help)."""
    root = Path(gpubp.__file__).resolve().parent.parent
    if not (root / "bench" / "__init__.py").is_file():
        raise CliError(f"gpubp bench runs from a source checkout: no bench/ package beside the gpubp package "
                       f"({root}); clone the repository and install it with pip install -e .")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import bench as suite
    sys.exit(suite.main(list(args)))


# ---- entry point --------------------------------------------------------------------------------------------------
def main(argv=None):
    """The console script: returns the exit status. Usage errors and bad input are one line on stderr, exit 2."""
    try:
        cli.main(args=argv, prog_name="gpubp", standalone_mode=False)
        return 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except SystemExit as exc:                  # sys.exit in a command (train's early stop, bench's status)
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        click.echo(exc.code, err=True)
        return 1
    except click.exceptions.Abort:
        click.echo("gpubp: interrupted", err=True)
        return 130
    except click.ClickException as exc:       # usage errors: a bad option value, a missing argument
        click.echo(_fail_line(exc.format_message()), err=True)
        return EXIT_BAD_INPUT if isinstance(exc, click.UsageError) else exc.exit_code
    except (CliError, ValueError, TypeError, OSError, ImportError, BackendUnavailable) as exc:
        if os.environ.get("GPUBP_TRACEBACK") == "1":
            raise
        click.echo(_fail_line(exc), err=True)
        # under mpiexec the other ranks may be waiting for this one: end the job
        gpubp.distributed.abort_job(_fail_line(exc), EXIT_BAD_INPUT)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
