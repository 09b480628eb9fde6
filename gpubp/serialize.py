"""Checkpoints: one .npz holding the architecture, dtype, parameters, optimizer state and the shuffling RNG, so a
resumed run equals the uninterrupted one. Loaded with allow_pickle=False: metadata is JSON text, never pickles.

Keys:  format ("gpubp-checkpoint-1")  meta (JSON: layers, dtype, seed, deterministic, steps, rng state,
       optimizer type and config, extra)  params (flat)  opt.<state name> (flat)  opt.step (int64, (1,))

`extra` is the caller's own JSON-able metadata (the command line keeps its preprocessing there); load returns
it as net.extra ({} when none was saved), and saving a loaded model again keeps it.
"""
import json
import os
import tempfile
import zipfile

import numpy as np

from .layers import Dense
from .params import FlatLayout

FORMAT = "gpubp-checkpoint-1"


def save(net, path, extra=None):
    """Write the checkpoint atomically: a temporary file beside `path`, then a rename, so an interrupted save
    never leaves a half-written checkpoint in its place. `extra`: a JSON-able dict kept with the model
    (default: net.extra, where a loaded model has one)."""
    path = os.fspath(path)
    extra = getattr(net, "extra", None) if extra is None else extra
    if extra is not None:
        if not isinstance(extra, dict):
            raise TypeError(f"extra: expected a dict of JSON-able metadata, got {type(extra).__name__}")
        try:
            json.dumps(extra, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"extra: expected JSON-able metadata ({exc})") from None
    meta = {
        "layers": [layer.config() for layer in net.layers],
        "dtype": net.dtype.name,
        "seed": net.seed,
        "deterministic": net.deterministic,
        "steps": net.steps,
        "rng": net.rng.bit_generator.state,
        "optimizer": None,
        "extra": extra or {},
    }
    arrays = {"format": np.array(FORMAT), "params": net.backend.to_numpy(net.params)}
    if net.optimizer is not None:
        meta["optimizer"] = {"type": type(net.optimizer).__name__, "config": net.optimizer.config()}
        for name, value in net.optimizer.state_arrays().items():
            arrays["opt." + name] = value
    arrays["meta"] = np.array(json.dumps(meta))
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".gpubp-", suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _bad(path, why):
    return ValueError(f"{path}: not a usable gpubp checkpoint: {why}")


def _read(npz, path, key, shape, kinds):
    """One array from the archive, its declared shape and dtype checked before its data is read."""
    if key not in npz.files:
        raise _bad(path, f"missing array {key!r}")
    try:
        with npz.zip.open(key + ".npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            header = read_header(f, max_header_size=10000)
    except Exception as exc:
        raise _bad(path, f"array {key!r} has an unreadable header ({exc})") from None
    declared_shape, _, dtype = header
    if dtype.hasobject or dtype.kind not in kinds:
        raise _bad(path, f"array {key!r} has dtype {dtype}, expected kind {kinds!r}")
    if shape is not None and tuple(declared_shape) != tuple(shape):
        raise _bad(path, f"array {key!r} has shape {tuple(declared_shape)}, expected {tuple(shape)}")
    try:
        return npz[key]
    except Exception as exc:
        raise _bad(path, f"array {key!r} cannot be read ({type(exc).__name__}: {exc}); truncated?") from None


def load(path, backend="auto"):
    """The model saved at `path`, on `backend`, with its optimizer (as model.optimizer) when one was saved."""
    from .network import Sequential
    from .optim import OPTIMIZERS
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    # We open the file ourselves: np.load leaves its own handle open when a truncated archive makes it fail.
    fh = open(path, "rb")
    try:
        npz = np.load(fh, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        fh.close()
        raise _bad(path, f"cannot be read as .npz ({type(exc).__name__}: {exc}); truncated or another format?") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        fh.close()
        raise _bad(path, "it is a single .npy array, not an .npz archive")
    with fh, npz:
        fmt = _read(npz, path, "format", (), "U")
        if str(fmt) != FORMAT:
            raise _bad(path, f"format is {str(fmt)!r}, expected {FORMAT!r}")
        try:
            meta = json.loads(str(_read(npz, path, "meta", (), "U")))
            layers = [Dense(c["n_in"], c["n_out"], c["activation"], bias=c["bias"], alpha=c["alpha"])
                      for c in meta["layers"]]
            dtype, seed, steps = meta["dtype"], meta["seed"], int(meta["steps"])
            opt_meta = meta["optimizer"]
        except (ValueError, TypeError, KeyError) as exc:
            raise _bad(path, f"its metadata is malformed ({type(exc).__name__}: {exc})") from None
        layout = FlatLayout(layers)
        params = _read(npz, path, "params", (layout.size,), "f")
        if not np.isfinite(params).all():
            raise _bad(path, "its parameters hold NaN or inf")
        opt_arrays = {}
        if opt_meta is not None:
            if not isinstance(opt_meta, dict) or opt_meta.get("type") not in OPTIMIZERS:
                raise _bad(path, f"unknown optimizer {opt_meta!r}")
            for name in OPTIMIZERS[opt_meta["type"]].state_names:
                opt_arrays[name] = _read(npz, path, "opt." + name, (layout.size,), "f")
            opt_arrays["step"] = _read(npz, path, "opt.step", (1,), "iu")
    try:
        net = Sequential(*layers, backend=backend, dtype=dtype, seed=seed, deterministic=meta.get("deterministic", False))
        net.rng.bit_generator.state = meta["rng"]
    except (TypeError, KeyError) as exc:
        raise _bad(path, f"its metadata is malformed ({type(exc).__name__}: {exc})") from None
    net.backend.copy_into(net.params, params)
    net.steps = steps
    net.extra = meta.get("extra") or {}
    if not isinstance(net.extra, dict):
        raise _bad(path, f"its extra metadata is not a dict ({type(net.extra).__name__})")
    if opt_meta is not None:
        config = dict(opt_meta.get("config") or {})
        if "betas" in config:
            config["betas"] = tuple(config["betas"])
        try:
            optimizer = OPTIMIZERS[opt_meta["type"]](net, **config)
        except TypeError as exc:
            raise _bad(path, f"its optimizer settings are malformed ({exc})") from None
        optimizer.load_state_arrays(opt_arrays)
    return net
