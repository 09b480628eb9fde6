"""Optimizers: PyTorch's SGD and Adam rules, their state in flat buffers, one backend launch per step.

The base class owns validation, the step counter and the state's save/restore; each subclass names its state
buffers and makes one backend call (tinygrad's shape: one `_update` per optimizer).

The settings live in device memory too (`hyper`, float64, in the order of the backend's SGD_HYPER / ADAM_HYPER):
the kernels read them there, so a captured step needs no recapture when the learning rate changes. Setting an
attribute (`opt.lr = 0.01`) validates it and writes the device copy (one small host-to-device copy)."""
import math
import numbers

import numpy as np

from .backends.base import Backend


def _finite(value):
    try:
        return math.isfinite(value)
    except OverflowError:      # an int beyond float's range, 10**400
        return False


def _number(value, what, low=None, high=None, low_open=False, high_open=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not _finite(value):
        raise ValueError(f"{what}: expected a finite number, got {value!r}")
    value = float(value)
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{what}: expected a value {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{what}: expected a value {'<' if high_open else '<='} {high}, got {value!r}")
    return value


class Optimizer:
    state_names = ()   # flat state buffers, each the size of the parameter buffer

    def __init__(self, net, lr):
        from .network import Sequential
        if not isinstance(net, Sequential):
            raise TypeError(f"{type(self).__name__}: expected a gpubp.Sequential as first argument, got {type(net).__name__}")
        self.net = net
        be = net.backend
        self.hyper = be.empty((len(self.hyper_names),), np.float64)
        self.lr = lr                                 # validates lr and writes every setting into hyper
        self.state = {name: be.zeros((net.layout.size,), net.dtype) for name in self.state_names}
        self.step_count = be.zeros((1,), np.int64)   # on the device: a captured step reads and bumps it
        net.optimizer = self

    hyper_names = ()   # the settings in `hyper`, in the kernels' order

    def __setattr__(self, name, value):
        # Only the learning rate may change after construction (it is rewritten on the device); a changed
        # momentum or beta would silently not reach the kernels, so it is refused.
        if name in self._fixed_settings and "hyper" in self.__dict__:
            raise AttributeError(f"{type(self).__name__}.{name} is fixed once made; only lr may change "
                                 "(make a new optimizer for other settings)")
        super().__setattr__(name, value)

    _fixed_settings = ("momentum", "weight_decay", "nesterov", "dampening", "betas", "eps")

    @property
    def lr(self):
        return self._lr

    @lr.setter
    def lr(self, value):
        """A number, or a gpubp.schedules.Schedule (fit then sets the rate from it, see gpubp/schedules.py);
        setting a number drops the schedule."""
        from .schedules import Schedule
        schedule = value if isinstance(value, Schedule) else None
        self._set_lr(schedule.lr_at(0) if schedule is not None else value, scheduled=schedule is not None)
        self.schedule = schedule

    def _set_lr(self, value, scheduled=True):
        """Validate the rate and write it to the device, keeping the schedule. A schedule may reach 0 (a cosine's
        floor, as torch's); a rate set by hand must be positive."""
        self._lr = _number(value, f"{type(self).__name__} lr", 0.0, low_open=not scheduled)
        self._write_hyper()

    def _follow_schedule(self, t, per):
        """The scheduled rate for position t (an epoch, or a step: `per`), written only when it changes (one small
        host-to-device copy, no wait, no recapture)."""
        if self.schedule is not None and self.schedule.per == per:
            lr = self.schedule.lr_at(t)
            if lr != self._lr:
                self._set_lr(lr)

    def _write_hyper(self):
        self.net.backend.copy_into(self.hyper, np.array(self._hyper_values(), np.float64))

    def _hyper_values(self):
        raise NotImplementedError

    def step(self, guard):
        """θ ← update(θ, ∇θ) over the whole flat buffer, in place, guarded (gpubp/guard.py)."""
        self._update(self.net.backend, self.net.params, self.net.grads, guard)

    def _update(self, be, params, grads, guard):
        raise NotImplementedError

    @property
    def steps_taken(self):
        return int(self.net.backend.to_numpy(self.step_count)[0])

    def config(self):
        raise NotImplementedError

    def key(self):
        """What a captured step depends on besides its buffers: the optimizer's kind (its settings are read
        from device memory, so they may change between replays)."""
        return type(self).__name__

    def state_arrays(self):
        """{name: numpy copy} of the state, for a checkpoint (flat buffers packed: no padding)."""
        be, layout = self.net.backend, self.net.layout
        arrays = {name: layout.pack(be.to_numpy(buf)) for name, buf in self.state.items()}
        arrays["step"] = be.to_numpy(self.step_count)
        return arrays

    def load_state_arrays(self, arrays):
        be, layout = self.net.backend, self.net.layout
        for name in self.state_names:
            be.copy_into(self.state[name], layout.unpack(arrays[name]))
        be.copy_into(self.step_count, arrays["step"])

    def __repr__(self):
        config = dict(self.config(), **({"lr": self.schedule} if self.schedule is not None else {}))
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in config.items())})"


class SGD(Optimizer):
    """torch.optim.SGD: g = ∇θ + wd·θ; b = g (first step) or μ·b + (1 − dampening)·g;
    g = g + μ·b (Nesterov) or b;  θ ← θ − lr·g."""

    state_names = ("momentum_buffer",)
    hyper_names = Backend.SGD_HYPER

    def __init__(self, net, lr=0.01, momentum=0.0, weight_decay=0.0, nesterov=False, dampening=0.0):
        self.momentum = _number(momentum, "SGD momentum", 0.0)
        self.weight_decay = _number(weight_decay, "SGD weight_decay", 0.0)
        self.dampening = _number(dampening, "SGD dampening")
        if not isinstance(nesterov, bool):
            raise TypeError(f"SGD nesterov: expected True or False, got {nesterov!r}")
        if nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(f"SGD nesterov: needs momentum > 0 and dampening = 0 (as torch.optim.SGD), "
                             f"got momentum={momentum!r}, dampening={dampening!r}")
        self.nesterov = nesterov
        super().__init__(net, lr)

    def _hyper_values(self):
        return [self.lr, self.momentum, self.dampening, self.weight_decay, float(self.nesterov)]

    def _update(self, be, params, grads, guard):
        be.sgd_update(params, grads, self.state["momentum_buffer"], self.step_count, self.hyper, guard)

    def config(self):
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "nesterov": self.nesterov, "dampening": self.dampening}


class Adam(Optimizer):
    """torch.optim.Adam: g = ∇θ + wd·θ; m = β1·m + (1 − β1)·g; v = β2·v + (1 − β2)·g²;
    θ ← θ − lr/(1 − β1ᵗ) · m / (√v/√(1 − β2ᵗ) + ε)."""

    state_names = ("exp_avg", "exp_avg_sq")
    hyper_names = Backend.ADAM_HYPER

    def __init__(self, net, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Adam betas: expected a pair (beta1, beta2), got {betas!r}")
        self.betas = (_number(betas[0], "Adam betas[0]", 0.0, 1.0, high_open=True),
                      _number(betas[1], "Adam betas[1]", 0.0, 1.0, high_open=True))
        self.eps = _number(eps, "Adam eps", 0.0)
        self.weight_decay = _number(weight_decay, "Adam weight_decay", 0.0)
        super().__init__(net, lr)

    def _hyper_values(self):
        return [self.lr, self.betas[0], self.betas[1], self.eps, self.weight_decay]

    def _update(self, be, params, grads, guard):
        be.adam_update(params, grads, self.state["exp_avg"], self.state["exp_avg_sq"], self.step_count,
                       self.hyper, guard)

    def config(self):
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay}


OPTIMIZERS = {"SGD": SGD, "Adam": Adam}
