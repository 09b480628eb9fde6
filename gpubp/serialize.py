"""Checkpoints: one .npz holding the architecture, dtype, parameters, optimizer state and the shuffling RNG, so a
resumed run equals the uninterrupted one. Loaded with allow_pickle=False: metadata is JSON text, never pickles.

Keys:  format ("gpubp-checkpoint-1")  meta (JSON: layers, dtype, precision, fused, seed, deterministic, steps, rng state,
       optimizer type, config and schedule, extra, the loss and class labels fit last used)  params (flat, packed)
       opt.<state name> (flat, packed)  opt.step (int64, (1,))
       loss_scaler (float64, (6,); fp16 models only: gpubp/loss_scale.py's layout)
A file without "precision" or "fused" (written before they existed) loads with the default.

`extra` is the caller's own JSON-able metadata (the command line keeps its preprocessing there); load returns
it as net.extra ({} when none was saved), and saving a loaded model again keeps it.
"""
import json
import os
import tempfile
import zipfile

import numpy as np

from . import schedules
from .backends import BACKENDS, Backend
from . import loss_scale as LS
from .layers import Dense

FORMAT = "gpubp-checkpoint-1"
# A checkpoint's sizes come from its metadata, so a forged one could ask for any amount of memory: load refuses
# an architecture above this many parameters (1 GiB in float32, far beyond the MLPs gpubp is for) unless the
# caller raises the limit for a file they trust.
MAX_PARAMETERS = 2**28
_MAX_META_CHARS = 2**20      # the metadata is JSON of a few KB, `extra` included
_NPY_MAGIC = b"\x93NUMPY"


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
        "precision": net.precision,
        "fused": net.fused_setting,
        "seed": net.seed,
        "deterministic": net.deterministic,
        "steps": net.steps,
        "rng": net.rng.bit_generator.state,
        "optimizer": None,
        "extra": extra or {},
        "loss": net.loss,
        "classes": None if net.classes is None else net.classes.tolist(),
    }
    arrays = {"format": np.array(FORMAT), "params": net.layout.pack(net.backend.to_numpy(net.params))}
    if net.scaler is not None:
        arrays["loss_scaler"] = net.backend.to_numpy(net.scaler)
    if net.optimizer is not None:
        meta["optimizer"] = {"type": type(net.optimizer).__name__, "config": net.optimizer.config()}
        if net.optimizer.schedule is not None:
            meta["optimizer"]["schedule"] = net.optimizer.schedule.to_dict()
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


def _read(archive, path, key, shape, kinds, max_itemsize=8):
    """One array from the zip archive. The .npy header is checked (dtype kind and size, shape, and that the
    member holds exactly the bytes it declares) before any data is read, so a forged header or a compressed
    bomb costs nothing; every way the member can fail to read becomes a ValueError."""
    name = key + ".npy"
    if name not in archive.namelist():
        raise _bad(path, f"missing array {key!r}")
    info = archive.getinfo(name)
    try:
        with archive.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f".npy version {version} (gpubp writes 1.0)")
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            declared_shape, _, dtype = read_header(f, max_header_size=10000)
            if dtype.hasobject or dtype.kind not in kinds or dtype.itemsize > max_itemsize:
                raise _bad(path, f"array {key!r} has dtype {dtype}, expected kind {kinds!r} of at most {max_itemsize} bytes")
            if tuple(declared_shape) != tuple(shape):
                raise _bad(path, f"array {key!r} has shape {tuple(declared_shape)}, expected {tuple(shape)}")
            nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            if info.file_size != f.tell() + nbytes:
                raise _bad(path, f"array {key!r} holds {info.file_size - f.tell()} bytes of data, its header "
                                 f"declares {nbytes}")
            data = f.read(nbytes)
            if len(data) != nbytes:
                raise EOFError(f"{len(data)} of {nbytes} bytes")
    except ValueError as exc:
        if str(exc).startswith(f"{path}: "):
            raise
        raise _bad(path, f"array {key!r} cannot be read ({exc})") from None
    except Exception as exc:   # zipfile, zlib, OSError, EOFError: a truncated or corrupted archive
        raise _bad(path, f"array {key!r} cannot be read ({type(exc).__name__}: {exc}); truncated or corrupted?") from None
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def _parse_meta(text, path, max_parameters):
    """The metadata JSON as a dict whose layers are built Dense objects, every field checked; ValueError for
    anything malformed."""
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _bad(path, f"its metadata is not JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict):
        raise _bad(path, f"its metadata is a JSON {type(meta).__name__}, expected an object")
    missing = [k for k in ("layers", "dtype", "seed", "steps", "rng", "optimizer") if k not in meta]
    if missing:
        raise _bad(path, f"its metadata lacks {missing}")
    if not isinstance(meta["layers"], list) or not meta["layers"]:
        raise _bad(path, f"its metadata's layers are {meta['layers']!r:.80}, expected a non-empty list")
    layers = []
    for i, c in enumerate(meta["layers"]):
        try:
            layers.append(Dense(c["n_in"], c["n_out"], c["activation"], bias=c["bias"], alpha=c["alpha"]))
        except (TypeError, KeyError, IndexError, ValueError) as exc:
            raise _bad(path, f"layer {i} is malformed ({type(exc).__name__}: {exc})") from None
    # Python integers: a product that would wrap in int64 cannot slip under the limit.
    count = sum(layer.n_out * layer.n_in + (layer.n_out if layer.bias else 0) for layer in layers)
    if count > max_parameters:
        raise _bad(path, f"its architecture has {count} parameters, more than max_parameters={max_parameters}; "
                         "pass a larger max_parameters to load a file you trust")
    steps = meta["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps < 2**63:
        raise _bad(path, f"its metadata's steps is {steps!r}, expected a non-negative integer")
    optimizer = meta["optimizer"]
    if optimizer is not None:
        if not isinstance(optimizer, dict) or not isinstance(optimizer.get("type"), str):
            raise _bad(path, f"its optimizer is {optimizer!r:.80}, expected {{'type': ..., 'config': {{...}}}}")
        if not isinstance(optimizer.get("config", {}), dict):
            raise _bad(path, f"its optimizer config is {optimizer['config']!r:.80}, expected a dict")
    extra = meta.get("extra") or {}
    if not isinstance(extra, dict):
        raise _bad(path, f"its extra metadata is not a dict ({type(extra).__name__})")
    return dict(meta, layers=layers, n_params=count, extra=extra)


def load(path, backend="auto", max_parameters=MAX_PARAMETERS):
    """The model saved at `path`, on `backend`, with its optimizer (as model.optimizer) when one was saved.
    A file that is not a usable checkpoint raises ValueError saying why; nothing in it is ever unpickled."""
    from .network import NotOnThisBackend, Sequential
    from .optim import OPTIMIZERS
    if not isinstance(backend, Backend) and not (isinstance(backend, str) and backend in BACKENDS + ("auto",)):
        raise ValueError(f"backend: expected one of {list(BACKENDS) + ['auto']}, got {backend!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    with open(path, "rb") as fh:
        if fh.read(len(_NPY_MAGIC)) == _NPY_MAGIC:
            raise _bad(path, "it is a single .npy array, not an .npz archive")
        fh.seek(0)
        try:
            archive = zipfile.ZipFile(fh)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise _bad(path, f"cannot be read as .npz ({type(exc).__name__}: {exc}); truncated or another format?") from None
        with archive:
            fmt = str(_read(archive, path, "format", (), "U", max_itemsize=4 * 64))
            if fmt != FORMAT:
                raise _bad(path, f"format is {fmt!r}, expected {FORMAT!r}")
            meta = _parse_meta(str(_read(archive, path, "meta", (), "U", max_itemsize=4 * _MAX_META_CHARS)),
                               path, max_parameters)
            params = _read(archive, path, "params", (meta["n_params"],), "f")
            opt_meta, opt_arrays = meta["optimizer"], {}
            if opt_meta is not None:
                if opt_meta["type"] not in OPTIMIZERS:
                    raise _bad(path, f"unknown optimizer {opt_meta['type']!r:.80}, expected one of {list(OPTIMIZERS)}")
                for name in OPTIMIZERS[opt_meta["type"]].state_names:
                    opt_arrays[name] = _read(archive, path, "opt." + name, (meta["n_params"],), "f")
                opt_arrays["step"] = _read(archive, path, "opt.step", (1,), "iu")
            scaler = None
            if meta.get("precision") == "fp16":
                scaler = _read(archive, path, "loss_scaler", (LS.SIZE,), "f")
                if not (np.isfinite(scaler).all() and 0 < scaler[LS.SCALE] <= LS.MAX_SCALE and scaler[LS.GOOD] >= 0
                        and scaler[LS.OVERFLOWS] >= 0 and scaler[LS.GROWTH_INTERVAL] >= 1
                        and scaler[LS.GROWTH] >= 1 and 0 < scaler[LS.BACKOFF] <= 1):
                    raise _bad(path, f"its loss scaler {scaler.tolist()} is out of range (scale in (0, 2^100], "
                                     "growth >= 1, backoff in (0, 1], counts >= 0)")
    try:
        net = Sequential(*meta["layers"], backend=backend, dtype=meta["dtype"], seed=meta["seed"],
                         deterministic=meta.get("deterministic", False), precision=meta.get("precision"), fused=meta.get("fused", "auto"))
        net.rng.bit_generator.state = meta["rng"]
        optimizer = None
        if opt_meta is not None:
            config, schedule = dict(opt_meta.get("config", {})), opt_meta.get("schedule")
            if schedule is not None:
                # made with its schedule, then given back the rate it had (which a schedule may have taken to 0)
                saved_lr, config["lr"] = config.get("lr"), schedules.from_dict(schedule)
            optimizer = OPTIMIZERS[opt_meta["type"]](net, **config)
            if schedule is not None:
                optimizer._set_lr(saved_lr)
        if meta.get("loss") is not None:
            net._check_loss(meta["loss"])             # a known name that suits the output layer
            net.loss = meta["loss"]
        if meta.get("classes") is not None:
            if net.loss not in ("bce", "softmax_ce"):
                raise ValueError(f"class labels saved for the loss {net.loss!r}")
            net.classes = meta["classes"]             # checked: distinct strings or numbers, one per output
    except NotOnThisBackend as exc:   # a sound checkpoint, on a backend without its precision or fused path
        raise ValueError(f"{path}: cannot be loaded on this backend: {exc}") from None
    except (TypeError, ValueError, KeyError, IndexError, OverflowError) as exc:
        raise _bad(path, f"its metadata is malformed ({type(exc).__name__}: {exc})") from None
    # Checked in the model's dtype: a float64 value beyond float32's range would become inf there.
    for name, array in [("params", params)] + [("opt." + k, v) for k, v in opt_arrays.items() if k != "step"]:
        with np.errstate(over="ignore"):
            in_model_dtype = array.astype(net.dtype)
        if not np.isfinite(in_model_dtype).all():
            raise _bad(path, f"its {name!r} hold NaN or inf")
    if "exp_avg_sq" in opt_arrays and (opt_arrays["exp_avg_sq"] < 0).any():
        raise _bad(path, "its 'opt.exp_avg_sq' (a mean of squares) holds negative values")
    if opt_meta is not None and not 0 <= int(opt_arrays["step"][0]) < 2**63:
        raise _bad(path, f"its optimizer step is {opt_arrays['step'][0]}, expected a non-negative int64")
    net.backend.copy_into(net.params, net.layout.unpack(params))
    net.steps = meta["steps"]
    if scaler is not None:
        net.backend.copy_into(net.scaler, scaler)
    net.extra = meta["extra"]
    if optimizer is not None:
        optimizer.load_state_arrays(opt_arrays)
    return net
