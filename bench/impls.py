"""Every implementation the suite times, ours and our peers', behind one small interface.

An implementation (Impl) has a name, a device ("cpu" or "cuda"), a probe saying whether it can run here and why
not, and a factory per kind of work it can do:

    gemm(sets)                 Z = A · Wᵀ                      sets: [(A (n, n), W (n, n))]
    dense(sets)                A_out = relu(A · Wᵀ + b)        sets: [(A (N, in), W (out, in), b (out,))]
    train(spec, params0, sets, lr)   one SGD step (momentum 0.9) on the MLP `spec`, from params0
                                     sets: [(X (N, in), Y (N, out))], float32 numpy
    fit(spec, params0, data, lr)     one epoch of the public `Sequential.fit` (shuffled, batch spec.batch)
                                     data: (X (samples, in), Y (samples, out)), float32 numpy, kept on the host
    predict(spec, params0, sets)     inference: the MLP's output (N, out) for input set i (the fused workload)
                                     sets: [(X (N, in), Y (N, out))] as train's; Y unused

Each factory moves the numpy inputs to its device (not timed) and returns a Runner: run(i) does the work on
input set i, sync() waits for the device, result() returns what run computed last as numpy (gemm, dense) or
the parameters [{"W", "b"}] (train, fit), the output (predict), peak_bytes() the device memory the runner added
(None where unknown), info() a note for the row on how it ran (e.g. whether CUDA graphs were replayed; None where nothing to say).

Each implementation belongs to a family (ours-cupy, ours-numba, ours-numpy, cublas, torch, torch-cpu, jax):
gpu_check runs one process per family (`python -m bench --family ...`), so a sticky CUDA error in one family
cannot fail the rows of the others.

A train `spec` carries a GEMM precision (spec.precision, gpubp/precision.py): "fp32" everywhere but the mixed
and fused workloads, whose "bf16" rows run gpubp with precision="bf16" and torch under torch.autocast(bfloat16); an
implementation lists the precisions it can train in (Impl.precisions), the others are not asked.

The fused workload (issue 13) runs only the implementations made for it on our side (Impl.only: gpubp with
fused=True, the fully fused MLP, and fused=False, the per-layer tensor-core kernels, for the ratio) and every
peer that trains in bf16.

Peers compute the same math in the same precision: float32 everywhere (but the mixed rows), TF32 off (torch's matmul precision
"highest", JAX's default matmul precision "highest", CuPy without CUPY_TF32). The MLP is Dense+ReLU hidden
layers and an identity output layer, with gpubp's losses: softmax_ce (one-hot float targets) and mse, which
gpubp defines as (1/N) Σₙ ½‖ŷₙ − yₙ‖² (torch's MSELoss is the mean over N·out and has no ½).
"""
import functools
import os

import numpy as np

MOMENTUM = 0.9


class Runner:
    def __init__(self, run, sync, result, peak_bytes=None, keep=None, info=None):
        self.run = run
        self.sync = sync
        self.result = result
        self.peak_bytes = peak_bytes or (lambda: None)
        self.keep = keep    # objects that must outlive the runs (graphs, buffers)
        self.info = info or (lambda: None)


class Impl:
    def __init__(self, name, device, probe, gemm=None, dense=None, train=None, fit=None, ours=False, note="",
                 family=None, precisions=("fp32",), predict=None, only=None):
        self.name, self.device, self.probe = name, device, probe
        self.precisions = precisions
        self.gemm, self.dense, self.train, self.fit, self.predict = gemm, dense, train, fit, predict
        self.only = only    # the workloads this implementation runs in (None: every one whose work it does)
        self.ours = ours
        self.note = note
        self.family = family or name

    def supports(self, kind):
        return getattr(self, kind) is not None

    def __repr__(self):
        return f"Impl({self.name!r}, {self.device!r})"


# ---- probes: (usable here, why not) ---------------------------------------------------------------------------
def _gpubp_probe(name):
    def probe():
        from gpubp.backends import availability
        ok, reason = availability()[name]
        if not ok:
            return False, reason
        if name != "numpy":
            from gpubp.backends import get_backend
            if not getattr(get_backend(name), "real_gpu", True):
                return False, "runs on the CUDA simulator here, not on a GPU: not timed"
        return True, ""
    return probe


def _torch():
    try:
        import torch
    except ImportError as exc:
        return None, f"torch is not installed ({exc})"
    torch.set_float32_matmul_precision("highest")     # fp32 GEMMs: no TF32
    return torch, ""


def _torch_cpu_probe():
    torch, reason = _torch()
    return (torch is not None), reason


def _torch_cuda_probe():
    torch, reason = _torch()
    if torch is None:
        return False, reason
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False)"
    return True, ""


def _jax():
    # JAX takes 75% of the GPU's memory at start unless told not to; the other libraries share the device.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        import jax
    except ImportError as exc:
        return None, f"jax is not installed ({exc})"
    jax.config.update("jax_default_matmul_precision", "highest")   # fp32 GEMMs: no TF32
    return jax, ""


def _jax_probe():
    jax, reason = _jax()
    if jax is None:
        return False, reason
    try:
        gpus = jax.devices("gpu")
    except RuntimeError as exc:
        return False, f"jax {jax.__version__} has no GPU backend ({exc})"
    return (bool(gpus), "" if gpus else "jax sees no GPU")


def _cupy_probe():
    try:
        import cupy
    except ImportError as exc:
        return False, f"cupy is not installed ({exc})"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False, "cupy sees no CUDA device"
        (cupy.arange(4, dtype=cupy.float32) @ cupy.arange(4, dtype=cupy.float32)).item()
    except Exception as exc:     # no driver, no device, a broken CUDA setup: all mean "not here"
        return False, f"cupy cannot run a matmul here ({type(exc).__name__}: {exc})"
    if os.environ.get("CUPY_TF32", "0") != "0":
        return False, "CUPY_TF32 is set: cupy.matmul would use TF32, not fp32; unset it"
    return True, ""


# ---- gpubp, every backend ---------------------------------------------------------------------------------------
def _gpubp_gemm(backend_name):
    def make(sets):
        from gpubp import activations as acts
        from gpubp.backends import get_backend
        be = get_backend(backend_name)
        dev = [(be.asarray(A, np.float32), be.asarray(W, np.float32)) for A, W in sets]
        n, m = sets[0][0].shape[0], sets[0][1].shape[0]
        Z = be.empty((n, m), np.float32)
        be.copy_into(Z, np.full((n, m), np.nan, np.float32))      # poisoned: an unwritten element shows

        def run(i):
            A, W = dev[i]
            be.dense_forward(A, W, None, acts.IDENTITY, 0.0, Z, Z)
        return Runner(run, be.synchronize, lambda: be.to_numpy(Z), keep=dev)
    return make


def _gpubp_dense(backend_name):
    def make(sets):
        from gpubp import activations as acts
        from gpubp.backends import get_backend
        be = get_backend(backend_name)
        dev = [tuple(be.asarray(x, np.float32) for x in s) for s in sets]
        N, out = sets[0][0].shape[0], sets[0][1].shape[0]
        Z, A_out = be.empty((N, out), np.float32), be.empty((N, out), np.float32)
        be.copy_into(A_out, np.full((N, out), np.nan, np.float32))

        def run(i):
            A, W, b = dev[i]
            be.dense_forward(A, W, b, acts.RELU, 0.0, Z, A_out)
        return Runner(run, be.synchronize, lambda: be.to_numpy(A_out), keep=dev)
    return make


def gpubp_net(spec, params0, lr, backend, dtype="float32", fused="auto"):
    """A gpubp Sequential for `spec` with params0 and SGD(lr, momentum 0.9), on `backend` (a name or instance);
    in spec.precision for float32 (a float64 model, the reference, multiplies in float64); `fused` as
    Sequential's (True: the fully fused MLP or a ValueError saying why not; False: the per-layer kernels)."""
    import gpubp
    layers = [gpubp.Dense(n_in, n_out, activation="relu" if k < len(spec.dims) - 2 else "identity")
              for k, (n_in, n_out) in enumerate(zip(spec.dims[:-1], spec.dims[1:]))]
    precision = getattr(spec, "precision", "fp32") if np.dtype(dtype) == np.float32 else None
    net = gpubp.Sequential(*layers, backend=backend, dtype=dtype, seed=0, precision=precision, fused=fused)
    net.set_params(params0)
    opt = gpubp.SGD(net, lr=lr, momentum=MOMENTUM)
    return net, opt


def _memory_meter(be):
    """A function giving the device bytes added since it was made: the CuPy pool's bytes for the cupy backend
    (the pool keeps freed blocks, so its total is the peak it needed), the drop in the device's free memory for
    others (coarse: the driver's granularity); None on the CPU."""
    if be.name == "numpy":
        return lambda: None
    try:
        import cupy
    except ImportError:
        return lambda: None
    be.synchronize()
    if be.name == "cupy":
        pool = cupy.get_default_memory_pool()
        pool.free_all_blocks()
        base = pool.total_bytes()
        return lambda: int(pool.total_bytes() - base)
    free0 = cupy.cuda.runtime.memGetInfo()[0]
    return lambda: int(free0 - cupy.cuda.runtime.memGetInfo()[0])


def graph_info(be):
    """How a backend ran its steps, from what it keeps about them: which step keys were captured as CUDA graphs
    (and replayed), which ran eagerly and why; None for a backend that keeps no such record."""
    steps = getattr(be, "_steps", None)
    if steps is None:
        return None
    graphed = sorted(str(k[0]) for k, v in steps.items() if isinstance(v, tuple))
    eager = sorted(str(k[0]) for k, v in steps.items() if v == "eager")
    parts = [f"CUDA graphs replayed: {', '.join(graphed) or 'none'}"]
    if eager:
        errors = getattr(be, "graph_errors", {})
        parts.append(f"eager after a failed capture: {', '.join(eager)} "
                     f"({'; '.join(str(e)[:120] for e in errors.values())})")
    if not getattr(be, "use_graphs", True):
        parts.append("graphs switched off (GPUBP_CUDA_GRAPHS=0)")
    return "; ".join(parts)


def path_note(net):
    """Which path a gpubp model's steps ran: the fully fused MLP (gpubp/fused.py) or the per-layer kernels."""
    return "path: fused MLP" if net.fused else "path: per-layer kernels"


def _gpubp_train(backend_name, checked=True, host_batches=False, fused="auto", sync=True):
    """checked=True times the public Sequential.train_step (input validation, finite checks, loss to host);
    checked=False the step behind it (Sequential._train_step), to show what the checks cost.
    host_batches=True: the batches stay NumPy arrays, the path a user takes: each step copies them into the
    model's workspace, so the whole step (forward, loss, backward, then the update) can replay as CUDA graphs.
    Device batches (the default) are used in place, so forward and backward run eagerly (only the update is
    a graph): the two rows side by side show what the graph and the copy cost or save.
    fused: Sequential's setting (the fused workload's rows: True and False, side by side). sync=False: the public
    train_step(..., sync=False), which neither waits for the step nor reads device inputs back to check them (a
    fault is raised at the next read: result() reads the parameters), as a training loop that does not look at
    every loss runs, and as torch's eager step."""
    def make(spec, params0, sets, lr, backend=None):
        from gpubp import losses
        from gpubp.backends import get_backend
        be = get_backend(backend if backend is not None else backend_name)
        if host_batches:
            dev = [(np.ascontiguousarray(X, np.float32), np.ascontiguousarray(Y, np.float32)) for X, Y in sets]
        else:
            dev = [(be.asarray(X, np.float32), be.asarray(Y, np.float32)) for X, Y in sets]
        meter = _memory_meter(be)
        net, opt = gpubp_net(spec, params0, lr, be, fused=fused)
        loss_id = losses.loss_id(spec.loss)
        if not checked and not hasattr(net, "_train_step"):
            raise NotImplementedError("gpubp.Sequential has no _train_step (the unchecked step) any more")

        def run(i):
            X, Y = dev[i]
            if checked:
                net.train_step(X, Y, loss=spec.loss, optimizer=opt, **({} if sync else {"sync": False}))
            else:
                net._train_step(X, Y, loss_id, opt)
        return Runner(run, be.synchronize, net.get_params, peak_bytes=meter, keep=dev,
                      info=lambda: "; ".join(filter(None, [graph_info(be), path_note(net)])))
    return make


def _gpubp_predict(backend_name, fused):
    """Inference through the public Sequential.predict on batches already on the device, the output kept there
    (device=True: no copy to the host inside the timing), in spec.precision; fused as Sequential's."""
    def make(spec, params0, sets, backend=None):
        from gpubp.backends import get_backend
        be = get_backend(backend if backend is not None else backend_name)
        dev = [be.asarray(X, np.float32) for X, _ in sets]
        meter = _memory_meter(be)
        net, _ = gpubp_net(spec, params0, 0.01, be, fused=fused)     # the optimizer is never used
        last = {}

        def run(i):
            last["out"] = net.predict(dev[i], device=True)
        return Runner(run, be.synchronize, lambda: be.to_numpy(last["out"]), peak_bytes=meter, keep=dev,
                      info=lambda: path_note(net))
    return make


def _gpubp_fit(backend_name, steps_per_graph=1):
    """One epoch of the public Sequential.fit on NumPy data (shuffled, batch spec.batch), as a user calls it;
    steps_per_graph > 1: fit's option that replays that many consecutive batches as one CUDA graph."""
    def make(spec, params0, data, lr, backend=None):
        from gpubp.backends import get_backend
        be = get_backend(backend if backend is not None else backend_name)
        X, Y = (np.ascontiguousarray(a, np.float32) for a in data)
        meter = _memory_meter(be)
        net, opt = gpubp_net(spec, params0, lr, be)

        counted = {}

        def run(i):
            before = dict(getattr(be, "counters", {}))
            net.fit(X, Y, loss=spec.loss, optimizer=opt, epochs=1, batch_size=spec.batch, shuffle=True,
                    **({"steps_per_graph": steps_per_graph} if steps_per_graph > 1 else {}))
            counted.update({k: v - before.get(k, 0) for k, v in getattr(be, "counters", {}).items()})

        def info():
            return "; ".join(filter(None, [host_traffic(counted, spec.batches), graph_info(be), path_note(net)]))
        return Runner(run, be.synchronize, net.get_params, peak_bytes=meter, keep=(X, Y), info=info)
    return make


def host_traffic(counted, steps):
    """What the backend's counters (gpubp/backends/base.py: sync, d2h, h2d) saw in the last fit epoch, per step.
    All zero means the backend does not count (a fit from host data copies at least once), so it says that."""
    if not counted:
        return "host syncs: the backend has no counters"
    if not any(counted.values()):
        return "host syncs: not counted by this backend (its counters stayed 0)"
    return ("per step over the last epoch: " + ", ".join(f"{k} {v / steps:.3g}" for k, v in sorted(counted.items()))
            + " (the backend's counters)")


# ---- PyTorch ----------------------------------------------------------------------------------------------------
def _torch_device(device):
    torch, _ = _torch()
    return torch, torch.device("cuda" if device == "cuda" else "cpu")


def _torch_sync(torch, device):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _torch_gemm(device):
    def make(sets):
        torch, dev = _torch_device(device)
        data = [(torch.from_numpy(A).to(dev), torch.from_numpy(W).to(dev)) for A, W in sets]
        Z = torch.full((sets[0][0].shape[0], sets[0][1].shape[0]), float("nan"), device=dev)

        def run(i):
            A, W = data[i]
            torch.matmul(A, W.T, out=Z)
        return Runner(run, _torch_sync(torch, device), lambda: Z.cpu().numpy(), keep=data)
    return make


def _torch_dense(device):
    def make(sets):
        torch, dev = _torch_device(device)
        data = [tuple(torch.from_numpy(x).to(dev) for x in s) for s in sets]
        last = {}

        def run(i):
            A, W, b = data[i]
            last["A"] = torch.relu(torch.nn.functional.linear(A, W, b))
        return Runner(run, _torch_sync(torch, device), lambda: last["A"].cpu().numpy(), keep=data)
    return make


def torch_model(torch, spec, params0, device):
    layers = []
    for k, p in enumerate(params0):
        W = torch.from_numpy(np.asarray(p["W"], np.float32))
        lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=True)
        with torch.no_grad():
            lin.weight.copy_(W)
            lin.bias.copy_(torch.from_numpy(np.asarray(p["b"], np.float32)))
        layers.append(lin)
        if k < len(params0) - 1:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers).to(device)


def torch_loss(torch, spec, out, y):
    if spec.loss == "softmax_ce":
        return torch.nn.functional.cross_entropy(out, y)      # y: one-hot probabilities, mean over N
    return 0.5 * ((out - y) ** 2).sum(dim=1).mean()           # gpubp's mse: (1/N) Σ ½‖ŷ − y‖²


def _torch_params(model):
    linears = [m for m in model if hasattr(m, "weight")]
    return [{"W": m.weight.detach().cpu().numpy().copy(), "b": m.bias.detach().cpu().numpy().copy()}
            for m in linears]


def _torch_train(device, graph=False):
    """Eager: the usual zero_grad / forward / loss / backward / step. graph=True: the same step captured once per
    input set as a CUDA graph (torch.cuda.graphs' whole-network recipe) and replayed."""
    def make(spec, params0, sets, lr):
        torch, dev = _torch_device(device)
        data = [(torch.from_numpy(X).to(dev), torch.from_numpy(Y).to(dev)) for X, Y in sets]
        if device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            peak = lambda: int(torch.cuda.max_memory_allocated() - base)   # noqa: E731
        else:
            peak = None
        model = torch_model(torch, spec, params0, dev)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
        autocast = _torch_autocast(torch, spec, device)

        def step(X, Y):
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = torch_loss(torch, spec, model(X), Y)
            loss.backward()
            opt.step()

        if not graph:
            return Runner(lambda i: step(*data[i]), _torch_sync(torch, device), lambda: _torch_params(model),
                          peak_bytes=peak, keep=data)

        # Warm up on a side stream (the recipe's rule), capture one graph per input set, then put the
        # parameters back to params0 and zero the momentum: the next replay is then a first step again
        # (momentum buffer μ·0 + g = g, as torch's first step b = g).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step(*data[0])
        torch.cuda.current_stream().wait_stream(side)
        graphs = []
        for X, Y in data:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step(X, Y)
            graphs.append(g)
        with torch.no_grad():
            fresh = torch_model(torch, spec, params0, dev)
            for p, q in zip(model.parameters(), fresh.parameters()):
                p.copy_(q)
            for state in opt.state.values():
                if state.get("momentum_buffer") is not None:
                    state["momentum_buffer"].zero_()
        torch.cuda.synchronize()
        return Runner(lambda i: graphs[i].replay(), torch.cuda.synchronize, lambda: _torch_params(model),
                      peak_bytes=peak, keep=(data, graphs))
    return make


def _torch_predict(device, graph=False):
    """Inference: model(X) under torch.no_grad() and the spec's autocast (bf16 for the fused workload).
    graph=True: the forward captured once per input set as a CUDA graph and replayed (the train recipe's)."""
    def make(spec, params0, sets):
        torch, dev = _torch_device(device)
        data = [torch.from_numpy(X).to(dev) for X, _ in sets]
        model = torch_model(torch, spec, params0, dev)
        autocast = _torch_autocast(torch, spec, device)
        last = {}

        def forward(X):
            with torch.no_grad(), autocast():
                return model(X)

        if not graph:
            def run(i):
                last["out"] = forward(data[i])
            return Runner(run, _torch_sync(torch, device), lambda: last["out"].float().cpu().numpy(), keep=data)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                forward(data[0])
        torch.cuda.current_stream().wait_stream(side)
        graphs, outs = [], []
        for X in data:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                outs.append(forward(X))     # the graph's output buffer, rewritten by each replay
            graphs.append(g)
        torch.cuda.synchronize()

        def run(i):
            graphs[i].replay()
            last["out"] = outs[i]
        return Runner(run, torch.cuda.synchronize, lambda: last["out"].float().cpu().numpy(),
                      keep=(data, graphs, outs))
    return make


def _torch_autocast(torch, spec, device):
    """A context for the step's forward and loss: nothing for fp32; torch.autocast(bfloat16) for bf16 (fp32 master
    weights, bf16 GEMMs, as PyTorch users train in mixed precision; its weight cache off, which graph capture
    needs and eager steps do not miss, the weights changing every step)."""
    import contextlib
    precision = getattr(spec, "precision", "fp32")
    if precision == "fp32":
        return contextlib.nullcontext
    if precision != "bf16":
        raise NotImplementedError(f"torch rows train in fp32 or bf16, not {precision}")
    return lambda: torch.autocast(device_type=device, dtype=torch.bfloat16, cache_enabled=False)


def _torch_fit(device, graph=False):
    """One epoch of a PyTorch training loop with the data already on the device (uploaded once): each epoch's
    order is drawn from a generator in the state a gpubp model of the same seed has, so it shuffles exactly as
    gpubp's fit; batches are gathered on the device (index_select), the loss summed there and read once an epoch
    (one host synchronisation, as in our fit). graph=True: the step (gather, forward, loss, backward, update) is
    captured as a CUDA graph per batch size (torch.cuda.graphs' whole-network recipe) and replayed, its batch's
    indices copied into the graph's index buffer on the device first."""
    def make(spec, params0, data, lr):
        torch, dev = _torch_device(device)
        X, Y = (torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(dev) for a in data)
        N, batch = X.shape[0], spec.batch
        rng = gpubp_net(spec, params0, lr, "numpy")[0].rng      # the generator our fit shuffles with
        model = torch_model(torch, spec, params0, dev)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
        order = torch.empty(N, dtype=torch.int64, device=dev)
        total = torch.zeros((), dtype=torch.float32, device=dev)
        sizes = sorted({min(batch, N - b) for b in range(0, N, batch)})
        idx = {n: torch.arange(n, dtype=torch.int64, device=dev) for n in sizes}   # graph mode: the inputs

        def step(rows):
            opt.zero_grad(set_to_none=True)
            loss = torch_loss(torch, spec, model(X.index_select(0, rows)), Y.index_select(0, rows))
            loss.backward()
            opt.step()
            total.add_(loss.detach() * rows.shape[0])

        graphs = {}
        if graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    step(idx[sizes[-1]])
            torch.cuda.current_stream().wait_stream(side)
            for n in sizes:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    step(idx[n])
                graphs[n] = g
            with torch.no_grad():      # the warm-up and capture trained: start again from params0, momentum 0
                for p, q in zip(model.parameters(), torch_model(torch, spec, params0, dev).parameters()):
                    p.copy_(q)
                for state in opt.state.values():
                    if state.get("momentum_buffer") is not None:
                        state["momentum_buffer"].zero_()
            torch.cuda.synchronize()
        def run(i):
            order.copy_(torch.from_numpy(rng.permutation(N)))
            total.zero_()
            for b in range(0, N, batch):
                rows = order[b:b + batch]
                if graph:
                    idx[rows.shape[0]].copy_(rows)
                    graphs[rows.shape[0]].replay()
                else:
                    step(rows)
            float(total)                              # the epoch's one read of the device

        def info():
            return "host syncs: 1 per epoch (the epoch's loss read once; batches gathered on the device)"
        return Runner(run, _torch_sync(torch, device), lambda: _torch_params(model), keep=(X, Y, graphs, idx),
                      info=info)
    return make


# ---- CuPy (cuBLAS) ------------------------------------------------------------------------------------------------
def _cublas_gemm(sets):
    import cupy
    data = [(cupy.asarray(A), cupy.asarray(W)) for A, W in sets]
    Z = cupy.full((sets[0][0].shape[0], sets[0][1].shape[0]), cupy.nan, dtype=cupy.float32)

    def run(i):
        A, W = data[i]
        cupy.matmul(A, W.T, out=Z)
    return Runner(run, cupy.cuda.Device().synchronize, lambda: cupy.asnumpy(Z), keep=data)


# ---- JAX -------------------------------------------------------------------------------------------------------------
# Each builder takes the device, as torch's do: "cuda" is the GPU row (jax-jit), "cpu" runs the same code on
# JAX's CPU backend (tests/test_bench_peers_cpu.py checks it there; no GPU needed). Inputs are placed on that
# device with device_put, and jit runs where its inputs are.
def _jax_device(device):
    jax, _ = _jax()
    return jax, jax.devices("gpu" if device == "cuda" else "cpu")[0]


def _jax_sync(jax, state):
    return lambda: jax.block_until_ready(state["out"])


def _jax_applied(device, fn):
    """gemm and dense: fn(jax, *input set i) jit-compiled; its output is the result."""
    def make(sets):
        jax, dev = _jax_device(device)
        data = [jax.device_put(s, dev) for s in sets]
        f = jax.jit(functools.partial(fn, jax))
        state = {"out": f(*data[0])}

        def run(i):
            state["out"] = f(*data[i])
        return Runner(run, _jax_sync(jax, state), lambda: np.asarray(state["out"]), keep=data)
    return make


def _jax_gemm(device):
    return _jax_applied(device, lambda jax, A, W: A @ W.T)


def _jax_dense(device):
    return _jax_applied(device, lambda jax, A, W, b: jax.nn.relu(A @ W.T + b))


def _jax_mlp(jax, precision):
    """forward(params, X): the MLP's output (N, out), params [(W (out, in), b (out,))]. In bf16: every GEMM's
    operands cast to bfloat16, the products accumulated and returned in float32 (preferred_element_type), as
    gpubp's bf16 and torch's autocast (float32 master weights; the bias, activations and loss in float32)."""
    import jax.numpy as jnp
    if precision not in ("fp32", "bf16"):
        raise NotImplementedError(f"jax rows run in fp32 or bf16, not {precision}")

    def matmul_t(a, W):
        if precision == "fp32":
            return a @ W.T
        return jnp.dot(a.astype(jnp.bfloat16), W.T.astype(jnp.bfloat16), preferred_element_type=jnp.float32)

    def forward(params, X):
        a = X
        for k, (W, b) in enumerate(params):
            a = matmul_t(a, W) + b
            if k < len(params) - 1:
                a = jax.nn.relu(a)
        return a
    return forward


# NOTE: the jit-compiled functions are made once per loss and precision, not per runner: jit compiles once per
# shape, so the suite's check runner and timed runner of a case share a compilation (lr is an argument).
@functools.lru_cache(maxsize=None)
def _jax_sgd_step(loss, precision):
    """step(params, mom, X, Y, lr) -> (params, mom): one SGD-momentum step on the MLP of _jax_mlp; the parameters
    and the momentum are donated (the new ones are written in their place)."""
    jax, _ = _jax()
    forward = _jax_mlp(jax, precision)

    def loss_fn(params, X, Y):
        out = forward(params, X)
        if loss == "softmax_ce":
            return -(Y * jax.nn.log_softmax(out, axis=1)).sum(axis=1).mean()
        return 0.5 * ((out - Y) ** 2).sum(axis=1).mean()     # gpubp's mse: (1/N) Σ ½‖ŷ − y‖²

    def step(params, mom, X, Y, lr):
        grads = jax.grad(loss_fn)(params, X, Y)
        mom = jax.tree_util.tree_map(lambda m, g: MOMENTUM * m + g, mom, grads)   # torch: b = μ·b + g
        params = jax.tree_util.tree_map(lambda p, m: p - lr * m, params, mom)
        return params, mom
    return jax.jit(step, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=None)
def _jax_forward(precision):
    jax, _ = _jax()
    return jax.jit(_jax_mlp(jax, precision))


def _jax_params(params0):
    """params0 as [(W, b)] float32 numpy, copied: the train step donates its buffers, and nothing it may write
    into can be params0, every implementation's start."""
    return [(np.array(p["W"], np.float32), np.array(p["b"], np.float32)) for p in params0]


def _jax_train(device):
    """One SGD-momentum step (_jax_sgd_step) in spec.precision, from params0 with momentum 0."""
    def make(spec, params0, sets, lr):
        jax, dev = _jax_device(device)
        data = [jax.device_put(s, dev) for s in sets]
        step = _jax_sgd_step(spec.loss, getattr(spec, "precision", "fp32"))
        lr = np.float32(lr)
        params = _jax_params(params0)
        # momentum starts at 0, so the first step's buffer is μ·0 + g = g: torch's first step.
        state = {"out": jax.device_put((params, jax.tree_util.tree_map(np.zeros_like, params)), dev)}

        def run(i):
            state["out"] = step(*state["out"], *data[i], lr)

        def result():     # copies, as torch's: the next step donates these buffers
            return [{"W": np.array(W), "b": np.array(b)} for W, b in state["out"][0]]
        return Runner(run, _jax_sync(jax, state), result, keep=data)
    return make


def _jax_predict(device):
    """Inference: the jit-compiled forward of _jax_mlp (bf16 operands for the fused workload), output float32."""
    def make(spec, params0, sets):
        jax, dev = _jax_device(device)
        data = [jax.device_put(X, dev) for X, _ in sets]
        params = jax.device_put(_jax_params(params0), dev)
        forward = _jax_forward(getattr(spec, "precision", "fp32"))
        state = {"out": forward(params, data[0])}

        def run(i):
            state["out"] = forward(params, data[i])
        return Runner(run, _jax_sync(jax, state), lambda: np.asarray(state["out"]), keep=(data, params))
    return make


def jax_impl(name, device, probe):
    """JAX jit's implementation on `device`: the registry's jax-jit on the GPU; the tests build it on the CPU."""
    return Impl(name, device, probe, gemm=_jax_gemm(device), dense=_jax_dense(device), train=_jax_train(device),
                predict=_jax_predict(device), family="jax", precisions=MIXED)


UNCHECKED_NOTE = "Sequential._train_step: the step without train_step's input checks"
DEVICE_INPUT_NOTE = ("train: the public train_step on batches already on the device, used in place (a step on "
                     "buffers the caller owns is not replayed from a graph); fit: the public Sequential.fit on "
                     "NumPy data, one epoch")
GRAPH8_NOTE = ("fit: the public Sequential.fit on NumPy data, one epoch, with steps_per_graph=8: 8 consecutive "
               "batches captured and replayed as one CUDA graph (groups end at the host's reads)")
HOST_BATCHES_NOTE = ("the public train_step on NumPy batches, copied into the model's workspace each step (the "
                     "path a user takes): the whole step can replay as a CUDA graph")


# ---- the registry ------------------------------------------------------------------------------------------------
MIXED = ("fp32", "bf16")   # what the train rows of gpubp, torch and jax run in (mixed and fused workloads: bf16)
FUSED_NOTE = ("fused=True: the fully fused MLP (kernels/fused_mlp.cu); train: the public train_step(..., "
              "sync=False) on device batches (no host read per step); predict: the public predict(X, device=True) "
              "on device batches (its finiteness check of X is one more pass over X and one wait)")
PER_LAYER_NOTE = ("fused=False: the per-layer kernels (tensor cores in bf16), for the ratio to the fused path; "
                  "train and predict as the fused row")


def _fused_pair(backend_name, device, family):
    """gpubp-<backend>-fused and gpubp-<backend>-per-layer: the fused workload's rows of ours, bf16."""
    return [Impl(f"gpubp-{backend_name}-{suffix}", device, _gpubp_probe(backend_name),
                 train=_gpubp_train(backend_name, fused=fused, sync=False),
                 predict=_gpubp_predict(backend_name, fused),
                 ours=True, family=family, note=note, precisions=("bf16",), only=("fused",))
            for suffix, fused, note in (("fused", True, FUSED_NOTE), ("per-layer", False, PER_LAYER_NOTE))]



def registry():
    """name -> Impl, in the order the table lists them (ours first)."""
    impls = [
        Impl("gpubp-numpy", "cpu", _gpubp_probe("numpy"), gemm=_gpubp_gemm("numpy"), dense=_gpubp_dense("numpy"),
             train=_gpubp_train("numpy"), fit=_gpubp_fit("numpy"), ours=True, family="ours-numpy", precisions=MIXED),
        Impl("gpubp-numpy-unchecked", "cpu", _gpubp_probe("numpy"), train=_gpubp_train("numpy", checked=False),
             ours=True, note=UNCHECKED_NOTE, family="ours-numpy"),
        *_fused_pair("numpy", "cpu", "ours-numpy"),
        Impl("gpubp-cupy", "cuda", _gpubp_probe("cupy"), gemm=_gpubp_gemm("cupy"), dense=_gpubp_dense("cupy"),
             train=_gpubp_train("cupy"), fit=_gpubp_fit("cupy"), ours=True, family="ours-cupy",
             note=DEVICE_INPUT_NOTE, precisions=MIXED),
        Impl("gpubp-cupy-numpy-batches", "cuda", _gpubp_probe("cupy"), train=_gpubp_train("cupy", host_batches=True),
             ours=True, family="ours-cupy", note=HOST_BATCHES_NOTE, precisions=MIXED),
        Impl("gpubp-cupy-unchecked", "cuda", _gpubp_probe("cupy"), train=_gpubp_train("cupy", checked=False),
             ours=True, note=UNCHECKED_NOTE, family="ours-cupy"),
        Impl("gpubp-cupy-graph8", "cuda", _gpubp_probe("cupy"), fit=_gpubp_fit("cupy", steps_per_graph=8),
             ours=True, note=GRAPH8_NOTE, family="ours-cupy"),
        *_fused_pair("cupy", "cuda", "ours-cupy"),
        Impl("gpubp-numba", "cuda", _gpubp_probe("numba"), gemm=_gpubp_gemm("numba"), dense=_gpubp_dense("numba"),
             train=_gpubp_train("numba"), fit=_gpubp_fit("numba"), ours=True, family="ours-numba",
             note=DEVICE_INPUT_NOTE, precisions=MIXED),
        Impl("gpubp-numba-numpy-batches", "cuda", _gpubp_probe("numba"),
             train=_gpubp_train("numba", host_batches=True), ours=True, family="ours-numba", note=HOST_BATCHES_NOTE, precisions=MIXED),
        Impl("torch-cpu", "cpu", _torch_cpu_probe, gemm=_torch_gemm("cpu"), dense=_torch_dense("cpu"),
             train=_torch_train("cpu"), fit=_torch_fit("cpu"), predict=_torch_predict("cpu"), family="torch-cpu",
             precisions=MIXED),
        Impl("cublas", "cuda", _cupy_probe, gemm=_cublas_gemm, note="cupy.matmul, TF32 off", family="cublas"),
        Impl("torch-eager", "cuda", _torch_cuda_probe, gemm=_torch_gemm("cuda"), dense=_torch_dense("cuda"),
             train=_torch_train("cuda"), fit=_torch_fit("cuda"), predict=_torch_predict("cuda"), family="torch",
             precisions=MIXED),
        Impl("torch-graph", "cuda", _torch_cuda_probe, train=_torch_train("cuda", graph=True),
             fit=_torch_fit("cuda", graph=True), predict=_torch_predict("cuda", graph=True),
             note="the step captured as a CUDA graph (per input set for train and predict, per batch size for fit), "
                  "replayed", family="torch", precisions=MIXED),
        jax_impl("jax-jit", "cuda", _jax_probe),
    ]
    return {impl.name: impl for impl in impls}


def families(reg=None):
    """family name -> [implementation names], in registry order."""
    out = {}
    for impl in (registry() if reg is None else reg).values():
        out.setdefault(impl.family, []).append(impl.name)
    return out


# The peer each device's rows are compared with (ratio = our time / the peer's time), per kind of work.
# fit's peer on the GPU is PyTorch's graph-captured loop (issue 11: beat it at the 64-wide shape).
PEER = {("cuda", "gemm"): "cublas", ("cuda", "dense"): "torch-eager", ("cuda", "train"): "torch-eager",
        ("cuda", "fit"): "torch-graph", ("cpu", "fit"): "torch-cpu",
        ("cpu", "gemm"): "torch-cpu", ("cpu", "dense"): "torch-cpu", ("cpu", "train"): "torch-cpu",
        ("cuda", "predict"): "torch-eager", ("cpu", "predict"): "torch-cpu"}
