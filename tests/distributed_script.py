"""What tests/test_distributed.py runs under `mpiexec -n S`: one scenario per launch (argv[1]), results written by
rank 0 to an .npz (argv[2]) for the test to check against a single process.

    train OUT      the CASES below, each trained data-parallel: every rank's parameters and history; then a
                   checkpoint written by rank 0 after one epoch and resumed by every rank; a step whose loss is
                   inf on rank 1 only; a callback on rank 0 alone that stops training mid-epoch; then ranks that
                   differ in architecture, dtype, precision or overlap, and the errors every rank raised; then
                   with overlap on (init(overlap=True)): the CASES again, a 3-layer model whose buckets group two
                   layers and a fused-MLP model (each also without overlap), and a NaN in rank 1's gradients at
                   step 2 beside the same run stopped after step 1
    raise OUT      rank 1 raises before fit: the job must end at once (MPI_Abort), naming rank 1
    kill OUT       rank 1 is killed (SIGKILL) after its first epoch: mpiexec must end the job
    hang OUT       rank 1 sleeps instead of calling fit: rank 0 must give up after init's timeout
"""
import os
import signal
import sys
import time
import warnings

import numpy as np

import gpubp

# (name, dtype, loss, optimizer, rows, per-rank batch): rows chosen so that the last global batch is uneven for
# 2 and 3 ranks, and leaves some rank no rows at all (50 rows, batch 8 on 2 ranks: 16 16 16 2; on 3 ranks with
# batch 4: 12 12 12 12 2).
CASES = [
    ("f64_sgd_mse", "float64", "mse", "sgd", 50, None),
    ("f32_adam_softmax", "float32", "softmax_ce", "adam", 45, 6),
    ("f64_adam_bce", "float64", "bce", "adam", 48, 8),
]
EPOCHS = 2


def batch_for(size, batch):
    return batch if batch is not None else {2: 8, 3: 4}.get(size, 4)


def data(loss, rows):
    rng = np.random.default_rng(7)
    X = rng.standard_normal((rows, 5))
    if loss == "softmax_ce":
        return X, rng.integers(0, 3, rows)
    if loss == "bce":
        return X, (rng.random((rows, 1)) > 0.5).astype(float)
    return X, rng.standard_normal((rows, 2))


# the 3-layer model's buckets at this size, float64: the last two layers in one bucket, the first in another
# (tests/test_distributed.py checks this with gradient_buckets)
DEEP_BUCKET_BYTES = 1000


def model(dtype, loss, hidden=7, precision=None, seed=3, depth=2):
    n_out = {"softmax_ce": 3, "bce": 1, "mse": 2}[loss]
    last = {"softmax_ce": "identity", "bce": "sigmoid", "mse": "identity"}[loss]
    hidden_layers = [gpubp.Dense(5 if i == 0 else hidden, hidden, "tanh") for i in range(depth - 1)]
    net = gpubp.Sequential(*hidden_layers, gpubp.Dense(hidden, n_out, last), backend="numpy", dtype=dtype,
                           seed=seed, precision=precision)
    return net


def set_overlap(overlap, bucket_bytes=0):
    """This rank's communicator with init's overlap settings changed (init again: the same world)."""
    return gpubp.distributed.init(timeout=float(os.environ.get("GPUBP_TEST_TIMEOUT", "60")), overlap=overlap,
                                  bucket_bytes=bucket_bytes)


def plant_nan(layer, at_call):
    """`layer` writes NaN into its dW at its backward call `at_call` (0-based), right after its weight gradient
    and before it says so (weight_grad_done): the NaN is in what its bucket sends."""
    original, calls = layer.backward, [0]

    def backward(be, A_prev, delta, prev=None, weight_grad_done=None):
        def done():
            if calls[0] == at_call:
                layer.dW[0, 0] = np.nan
            calls[0] += 1
            if weight_grad_done is not None:
                weight_grad_done()
        original(be, A_prev, delta, prev, done)
    layer.backward = backward


def optimizer(net, name):
    return gpubp.SGD(net, lr=0.1, momentum=0.9) if name == "sgd" else gpubp.Adam(net, lr=0.01)


class StopAt(gpubp.callbacks.Callback):
    """Sets model.stop_training at batch `batch` of epoch `epoch` (0-based)."""

    def __init__(self, epoch, batch):
        self.epoch, self.batch, self.current = epoch, batch, None

    def wants_batches(self):
        return True

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_batch_end(self, batch, logs=None):
        if (self.current, batch) == (self.epoch, self.batch):
            self.model.stop_training = True


def gather(comm, array):
    """Every rank's copy of `array`, stacked, on rank 0 (None elsewhere)."""
    return comm.mpi.gather(np.asarray(array), root=0)


def train_cases(comm, results, prefix=""):
    for name, dtype, loss, opt_name, rows, batch in CASES:
        X, y = data(loss, rows)
        net = model(dtype, loss, seed=3 + comm.rank)   # a different seed per rank: rank 0's model must win
        history = net.fit(X, y, loss, optimizer(net, opt_name), epochs=EPOCHS,
                          batch_size=batch_for(comm.size, batch), comm=comm)
        params = gather(comm, net.backend.to_numpy(net.params))
        steps = gather(comm, net.steps)
        if comm.rank == 0:
            results[f"{prefix}{name}.params"] = np.stack(params)
            results[f"{prefix}{name}.steps"] = np.array(steps)
            for key, values in history.items():
                results[f"{prefix}{name}.history.{key}"] = np.array(values)


def fused_model():
    """A model that takes the fused MLP path (bf16, one hidden width 16): its backward is one call."""
    net = gpubp.Sequential(gpubp.Dense(5, 16, "relu"), gpubp.Dense(16, 16, "relu"), gpubp.Dense(16, 2),
                           backend="numpy", precision="bf16", seed=3)
    assert net.fused
    return net


# models trained with and without overlap, by the overlapped run's bucket_bytes
OTHER_MODELS = {"deep": (lambda: model("float64", "mse", depth=3), DEEP_BUCKET_BYTES),
                "fused": (fused_model, 0)}


def train_other_models(comm, results, prefix=""):
    """OTHER_MODELS, 50 rows (an uneven last global batch), with comm's overlap at the model's bucket_bytes."""
    X, y = data("mse", 50)
    for name, (make, bucket_bytes) in OTHER_MODELS.items():
        comm = set_overlap(comm.overlap, bucket_bytes)
        net = make()
        net.fit(X, y, "mse", optimizer(net, "sgd"), epochs=EPOCHS, batch_size=batch_for(comm.size, None),
                comm=comm)
        params = gather(comm, net.backend.to_numpy(net.params))
        if comm.rank == 0:
            results[f"{prefix}{name}.params"] = np.stack(params)


def train_overlapped(comm, results):
    """With overlap on: the CASES, one bucket per layer; OTHER_MODELS with and without overlap; a NaN in rank 1's
    layer-0 gradients at step 2 (every rank must skip it and stop), beside the same run stopped after its good
    steps 0 and 1 by a callback."""
    comm = set_overlap(True, bucket_bytes=0)
    train_cases(comm, results, prefix="overlap.")
    train_other_models(comm, results, prefix="overlap.")
    comm = set_overlap(False)
    train_other_models(comm, results)

    comm = set_overlap(True, bucket_bytes=0)
    X, y = data("mse", 40)
    for run in ("nan", "stopped"):
        net = model("float64", "mse")
        if run == "nan" and comm.rank == 1:
            plant_nan(net.layers[0], at_call=2)
        callbacks = [StopAt(epoch=0, batch=1)] if run == "stopped" and comm.rank == 0 else []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # fit's "fit stopped" warning
            history = net.fit(X, y, "mse", optimizer(net, "sgd"), epochs=2, batch_size=4, comm=comm,
                              callbacks=callbacks, log_every=1)
        reasons, steps = comm.mpi.gather(str(history.stop_reason), root=0), gather(comm, net.steps)
        params = gather(comm, net.backend.to_numpy(net.params))
        if comm.rank == 0:
            results[f"overlap.{run}.reason"], results[f"overlap.{run}.steps"] = np.array(reasons), np.array(steps)
            results[f"overlap.{run}.params"] = np.stack(params)
    set_overlap(False)


def train(comm, out):
    results = {}
    train_cases(comm, results)

    # checkpoint after one epoch (rank 0 writes), every rank loads it and trains one more: the 2-epoch model
    name, dtype, loss, opt_name, rows, batch = CASES[0]
    X, y = data(loss, rows)
    net = model(dtype, loss)
    net.fit(X, y, loss, optimizer(net, opt_name), epochs=1, batch_size=batch_for(comm.size, batch), comm=comm)
    path = os.path.join(os.path.dirname(out), "distributed.npz")
    if comm.rank == 0:
        net.save(path)
    comm.mpi.Barrier()
    resumed = gpubp.load(path, backend="numpy")
    resumed.fit(X, y, loss, epochs=1, batch_size=batch_for(comm.size, batch), comm=comm)
    params = gather(comm, resumed.backend.to_numpy(resumed.params))
    if comm.rank == 0:
        results["resumed.params"] = np.stack(params)

    # a fault on one rank only: a float32 target so large that its squared error, hence the loss, is inf while
    # every gradient stays finite. The loss is summed with the gradients, so every rank sees it and skips the step
    X, y = data("mse", 40)
    y = y.astype(np.float32)
    y[batch_for(comm.size, None)] = 3e20            # rank 1's first row (no shuffling)
    net = model("float32", "mse")
    initial = net.backend.to_numpy(net.params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # fit's "fit stopped" warning
        # rank 0 alone reads the device after every step (as a progress bar would): every rank must then read
        # at the same steps, or rank 0 would stop at step 1 and the others run on
        history = net.fit(X, y, "mse", optimizer(net, "sgd"), epochs=2, batch_size=batch_for(comm.size, None),
                          shuffle=False, comm=comm, log_every=1 if comm.rank == 0 else None)
    reasons = comm.mpi.gather(str(history.stop_reason), root=0)
    params = gather(comm, net.backend.to_numpy(net.params))
    if comm.rank == 0:
        results["fault.stop_reason"] = np.array(reasons)
        results["fault.params"] = np.stack(params)
        results["fault.initial"] = initial

    # a callback on rank 0 alone stops training in the middle of the second epoch: every rank stops there
    X, y = data("mse", 40)
    net = model("float64", "mse")
    callbacks = [StopAt(epoch=1, batch=1)] if comm.rank == 0 else []
    history = net.fit(X, y, "mse", optimizer(net, "sgd"), epochs=3, batch_size=4, comm=comm, callbacks=callbacks)
    steps, params = gather(comm, net.steps), gather(comm, net.backend.to_numpy(net.params))
    reasons = comm.mpi.gather(str(history.stop_reason), root=0)
    if comm.rank == 0:
        results["stop.steps"], results["stop.params"] = np.array(steps), np.stack(params)
        results["stop.reason"], results["stop.epochs"] = np.array(reasons), np.array(len(history["loss"]))
    # and at the end of an epoch (on_epoch_end returns "stop" on rank 0 alone)
    history = net.fit(X, y, "mse", epochs=3, batch_size=4, comm=comm,
                      on_epoch_end=(lambda epoch, logs: "stop") if comm.rank == 0 else None)
    epochs, reasons = comm.mpi.gather(len(history["loss"]), root=0), comm.mpi.gather(str(history.stop_reason), root=0)
    if comm.rank == 0:
        results["stop_epoch.epochs"], results["stop_epoch.reason"] = np.array(epochs), np.array(reasons)

    # a rank that differs: every rank must raise (no rank may hang), and say what differs
    for what, kwargs in (("architecture", {"hidden": 9}), ("dtype", {"dtype": "float32"}),
                         ("precision", {"dtype": "float32", "precision": "bf16"}), ("overlap", {})):
        base = {"dtype": "float64", "loss": "mse"}
        if what == "precision":
            base["dtype"] = "float32"
        net = model(**dict(base, **(kwargs if comm.rank == comm.size - 1 else {})))
        before = net.backend.to_numpy(net.params)
        comm = set_overlap(what == "overlap" and comm.rank == comm.size - 1)
        try:
            net.fit(*data("mse", 20), "mse", optimizer(net, "sgd"), epochs=1, batch_size=4, comm=comm)
            message = "no error"
        except ValueError as exc:
            message = str(exc)
        comm = set_overlap(False)
        messages = comm.mpi.gather(message, root=0)
        untouched = comm.mpi.gather(bool(np.array_equal(before, net.backend.to_numpy(net.params))), root=0)
        if comm.rank == 0:
            results[f"mismatch.{what}"] = np.array(messages)
            results[f"mismatch.{what}.untouched"] = np.array(untouched)

    train_overlapped(comm, results)
    if comm.rank == 0:
        np.savez(out, **results)


def faults(comm, scenario):
    X, y = data("mse", 40)
    net = model("float64", "mse")
    opt = optimizer(net, "sgd")
    if comm.rank == 1 and scenario == "raise":
        raise RuntimeError("planted failure on rank 1")
    if comm.rank == 1 and scenario == "hang":
        time.sleep(120)
    kill = (lambda epoch, logs: os.kill(os.getpid(), signal.SIGKILL)) if comm.rank == 1 and scenario == "kill" else None
    net.fit(X, y, "mse", opt, epochs=200, batch_size=4, comm=comm, on_epoch_end=kill)


def main():
    scenario, out = sys.argv[1], sys.argv[2]
    timeout = float(os.environ.get("GPUBP_TEST_TIMEOUT", "60"))
    comm = gpubp.distributed.init(timeout=timeout)
    assert comm.size > 1 and comm.transport.name == "mpi", comm
    if scenario == "train":
        train(comm, out)
    else:
        faults(comm, scenario)


if __name__ == "__main__":
    main()
