"""Backend registry. `get_backend(name)` returns a fresh backend instance; "auto" picks cupy, else numba on a
real GPU, else numpy. A backend that cannot run here raises BackendUnavailable saying why.

Each GPU backend module exposes `available() -> (bool, reason)` and its Backend subclass; modules are
imported only when asked for, so numpy-only machines never import cupy or numba."""
import importlib

from .base import Backend
from .numpy_backend import NumpyBackend

BACKENDS = ("numpy", "cupy", "numba")
_MODULES = {"cupy": ("cupy_backend", "CupyBackend"), "numba": ("numba_backend", "NumbaBackend")}


class BackendUnavailable(RuntimeError):
    """The asked-for backend cannot run on this machine; the message says why and what to do."""


def _load(name):
    module_name, class_name = _MODULES[name]
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as exc:
        return None, f"the {name} backend could not be imported ({exc}); install gpubp[cuda12] or gpubp[cuda13]"
    ok, reason = module.available()
    return (getattr(module, class_name) if ok else None), reason


def availability():
    """{backend name: (usable here, reason)} for every backend."""
    result = {"numpy": (True, "numpy runs anywhere")}
    for name in _MODULES:
        cls, reason = _load(name)
        result[name] = (cls is not None, reason)
    return result


def get_backend(name="auto", deterministic=False):
    if isinstance(name, Backend):
        return name
    if not isinstance(name, str) or name not in BACKENDS + ("auto",):
        raise ValueError(f"backend: expected one of {list(BACKENDS) + ['auto']}, got {name!r}")
    if name == "numpy":
        return NumpyBackend(deterministic)
    if name == "auto":
        for candidate in ("cupy", "numba"):
            cls, _ = _load(candidate)
            if cls is not None and getattr(cls, "real_gpu", True):
                return cls(deterministic)
        return NumpyBackend(deterministic)
    cls, reason = _load(name)
    if cls is None:
        raise BackendUnavailable(f"backend {name!r} cannot run here: {reason}")
    return cls(deterministic)
