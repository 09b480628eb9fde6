"""Hostile checkpoints: every malformed file is refused by gpubp.load with a ValueError that says the file is not
a usable checkpoint and why (FileNotFoundError where there is no file), without unpickling anything, without
allocating what a forged header declares, and without any other exception escaping (KeyError, IndexError,
OverflowError, RecursionError, MemoryError, zipfile errors)."""
import io
import json
import os
import pickle
import tracemalloc
import zipfile

import numpy as np
import pytest

import gpubp
from gpubp import serialize

REFUSED = "not a usable gpubp checkpoint"


# ---- building checkpoints, good and bad -------------------------------------------------------------------------
def good_checkpoint(path, optimizer="adam", dtype="float32"):
    rng = np.random.default_rng(0)
    net = gpubp.Sequential(gpubp.Dense(3, 4, "relu"), gpubp.Dense(4, 2, "identity", bias=False),
                           backend="numpy", dtype=dtype, seed=1)
    opt = gpubp.Adam(net, lr=0.01) if optimizer == "adam" else gpubp.SGD(net, lr=0.1, momentum=0.9)
    for _ in range(2):
        net.train_step(rng.standard_normal((5, 3)), rng.standard_normal((5, 2)), "mse", opt)
    net.save(path)
    return net


def npy_bytes(array):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asanyarray(array), allow_pickle=True)
    return buf.getvalue()


def npy_header_only(shape, dtype, payload=b""):
    """The bytes of a .npy whose header declares `shape` and `dtype`, followed by `payload` only."""
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + payload


def members_of(path):
    with zipfile.ZipFile(path) as z:
        return {name: z.read(name) for name in z.namelist()}


def write_members(path, members, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def edited(tmp_path, changes, base=None, compression=zipfile.ZIP_STORED):
    """A copy of a good checkpoint with members replaced ({key: array or raw bytes}) or removed (None)."""
    base = base or tmp_path / "good.npz"
    if not os.path.exists(base):
        good_checkpoint(base)
    members = members_of(base)
    for key, value in changes.items():
        if value is None:
            members.pop(key + ".npy")
        else:
            members[key + ".npy"] = value if isinstance(value, bytes) else npy_bytes(value)
    return write_members(tmp_path / "edited.npz", members, compression)


def meta_of(tmp_path):
    path = tmp_path / "good.npz"
    if not os.path.exists(path):
        good_checkpoint(path)
    with np.load(path, allow_pickle=False) as npz:
        return json.loads(str(npz["meta"]))


def with_meta(tmp_path, edit):
    """A copy of a good checkpoint whose metadata is edit(meta) (a dict to re-encode, or text as is)."""
    meta = edit(meta_of(tmp_path))
    text = meta if isinstance(meta, str) else json.dumps(meta)
    return edited(tmp_path, {"meta": np.array(text)})


def assert_refused(path, *words, peak_mb=64):
    """load(path) raises ValueError naming the file and the words, and allocates little on the way."""
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=REFUSED) as info:
            gpubp.load(path, backend="numpy")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert peak < peak_mb * 2**20, f"load allocated {peak / 2**20:.0f} MiB on the way to refusing"


# ---- the good case, for contrast ----------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_good_checkpoint_loads_exactly(tmp_path, optimizer):
    net = good_checkpoint(tmp_path / "good.npz", optimizer)
    loaded = gpubp.load(tmp_path / "good.npz", backend="numpy")
    assert np.array_equal(loaded.backend.to_numpy(loaded.params), net.backend.to_numpy(net.params))
    assert loaded.steps == net.steps and loaded.optimizer.steps_taken == net.optimizer.steps_taken
    for name, value in net.optimizer.state_arrays().items():
        assert np.array_equal(loaded.optimizer.state_arrays()[name], value)


# ---- not a checkpoint at all ------------------------------------------------------------------------------------
def test_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        gpubp.load(tmp_path / "absent.npz")
    with pytest.raises(FileNotFoundError):
        gpubp.load(tmp_path)                       # a directory is not a checkpoint file either


@pytest.mark.parametrize("content", [b"", b"hello, world\n", bytes(range(256)) * 4, b"PK\x03\x04" + b"\0" * 60,
                                     b"PK\x05\x06" + b"\0" * 18],
                         ids=["empty", "text", "binary", "zip-local-header-only", "empty-zip-directory"])
def test_not_a_zip_is_refused(tmp_path, content):
    path = tmp_path / "x.npz"
    path.write_bytes(content)
    assert_refused(path)


def test_a_pickle_is_refused_and_never_unpickled(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    path = tmp_path / "x.npz"
    path.write_bytes(pickle.dumps(Boom()))
    assert_refused(path)
    assert not (tmp_path / "pwned").exists()


def test_an_npy_instead_of_an_npz_is_refused(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros(10))
    assert_refused(path, ".npy")


def test_an_npy_with_a_huge_declared_shape_is_refused_without_allocating(tmp_path):
    path = tmp_path / "x.npz"
    path.write_bytes(npy_header_only((2**40,), "<f8", b"\0" * 64))
    assert_refused(path, ".npy")


def test_an_empty_zip_is_refused(tmp_path):
    assert_refused(write_members(tmp_path / "x.npz", {}), "missing")


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.4, 0.5, 0.6, 0.8, 0.95, 0.99])
def test_a_truncated_checkpoint_is_refused(tmp_path, fraction):
    good_checkpoint(tmp_path / "good.npz")
    data = (tmp_path / "good.npz").read_bytes()
    path = tmp_path / "cut.npz"
    path.write_bytes(data[:int(len(data) * fraction)])
    assert_refused(path)


def test_a_corrupted_member_is_refused(tmp_path):
    good_checkpoint(tmp_path / "good.npz")
    data = bytearray((tmp_path / "good.npz").read_bytes())
    start = data.index(b"\x93NUMPY", data.index(b"params.npy"))
    data[start + 200:start + 220] = b"\xff" * 20          # the zip's CRC no longer matches
    path = tmp_path / "bad.npz"
    path.write_bytes(bytes(data))
    assert_refused(path)


# ---- wrong keys, shapes and dtypes ------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["format", "meta", "params", "opt.exp_avg", "opt.exp_avg_sq", "opt.step"])
def test_a_missing_array_is_refused(tmp_path, key):
    assert_refused(edited(tmp_path, {key: None}), "missing", key)


def test_another_format_is_refused(tmp_path):
    assert_refused(edited(tmp_path, {"format": np.array("gpubp-checkpoint-99")}), "format")


def test_a_member_without_npy_suffix_is_refused(tmp_path):
    good_checkpoint(tmp_path / "good.npz")
    members = members_of(tmp_path / "good.npz")
    members["params"] = members.pop("params.npy")
    assert_refused(write_members(tmp_path / "x.npz", members))


BAD_ARRAYS = [
    ("params", np.zeros(5, np.float32), "shape"),
    ("params", np.zeros((24, 1), np.float32), "shape"),
    ("params", np.zeros(24, np.int32), "dtype"),
    ("params", np.zeros(24, np.complex64), "dtype"),
    ("params", np.array(["x"] * 24), "dtype"),
    ("params", np.array([None] * 24, dtype=object), "dtype"),
    ("params", np.full(24, np.nan, np.float32), "NaN"),
    ("params", np.r_[np.zeros(23), np.inf].astype(np.float32), "NaN"),
    ("params", np.full(24, 1e300), "NaN"),                 # finite in float64, inf in the model's float32
    ("opt.exp_avg", np.full(24, np.nan, np.float32), "NaN"),
    ("opt.exp_avg_sq", np.full(24, -1.0, np.float32), "negative"),
    ("opt.exp_avg_sq", np.zeros(23, np.float32), "shape"),
    ("opt.step", np.array([-3]), "step"),
    ("opt.step", np.array([2.0]), "dtype"),
    ("opt.step", np.array([1, 2]), "shape"),
    ("opt.step", np.array([2**64 - 1], np.uint64), "step"),
    ("format", np.array(["gpubp-checkpoint-1"]), "shape"),
    ("format", np.array(1.0), "dtype"),
    ("meta", np.array(b"{}"), "dtype"),
    ("meta", np.array(["{}", "{}"]), "shape"),
    ("meta", np.array([{"a": 1}], dtype=object), "dtype"),
]


@pytest.mark.parametrize("key, array, word", BAD_ARRAYS, ids=[f"{k}-{w}-{i}" for i, (k, _, w) in enumerate(BAD_ARRAYS)])
def test_a_wrong_array_is_refused(tmp_path, key, array, word):
    assert_refused(edited(tmp_path, {key: array}), word)


# ---- forged headers and bombs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, shape, dtype", [
    ("params", (2**40,), "<f4"),             # a size the metadata does not declare
    ("params", (24,), "<f4"),                # the right size declared, but the data is missing
    ("meta", (), "<U100000000"),            # a 4 GB metadata string
    ("format", (), "<U100000000"),
    ("opt.exp_avg", (2**62,), "<f8"),
])
def test_a_forged_header_is_refused_without_allocating(tmp_path, key, shape, dtype):
    assert_refused(edited(tmp_path, {key: npy_header_only(shape, dtype, b"\0" * 16)}))


def test_a_huge_architecture_is_refused_before_allocating(tmp_path):
    def huge(meta):
        meta["layers"] = [{"n_in": 100000, "n_out": 100000, "activation": "relu", "bias": True, "alpha": 0.01}] * 3
        return meta
    assert_refused(with_meta(tmp_path, huge), "parameters")


def test_an_architecture_whose_size_wraps_int64_is_refused(tmp_path):
    def wraps(meta):
        meta["layers"] = [{"n_in": 2**32, "n_out": 2**32, "activation": "relu", "bias": False, "alpha": 0.01}]
        meta["optimizer"] = None
        return meta
    assert_refused(with_meta(tmp_path, wraps), "parameters")


def test_a_zip_bomb_member_is_refused_without_inflating_it(tmp_path):
    # 400 MB of zeros in a ~400 KB deflated member, declared as the metadata string.
    bomb = npy_header_only((), "<U100000000") + b"\0" * 400_000_000
    good_checkpoint(tmp_path / "good.npz")
    members = members_of(tmp_path / "good.npz")
    members["meta.npy"] = bomb
    path = write_members(tmp_path / "bomb.npz", members, zipfile.ZIP_DEFLATED)
    del bomb, members
    assert os.path.getsize(path) < 5_000_000
    assert_refused(path)


def test_a_params_bomb_is_refused_without_inflating_it(tmp_path):
    # A deflated params member far larger than its header declares (padding after the data).
    bomb = npy_bytes(np.zeros(24, np.float32)) + b"\0" * 200_000_000
    good_checkpoint(tmp_path / "good.npz")
    members = members_of(tmp_path / "good.npz")
    members["params.npy"] = bomb
    path = write_members(tmp_path / "bomb.npz", members, zipfile.ZIP_DEFLATED)
    del bomb, members
    assert_refused(path, "params")


def test_a_compressed_good_checkpoint_still_loads(tmp_path):
    good_checkpoint(tmp_path / "good.npz")
    path = write_members(tmp_path / "z.npz", members_of(tmp_path / "good.npz"), zipfile.ZIP_DEFLATED)
    assert gpubp.load(path, backend="numpy").steps == 2


# ---- malformed metadata -------------------------------------------------------------------------------------------
def set_key(key, value):
    def edit(meta):
        meta[key] = value
        return meta
    return edit


def drop_key(key):
    def edit(meta):
        del meta[key]
        return meta
    return edit


def set_layer(index, key, value):
    def edit(meta):
        meta["layers"][index][key] = value
        return meta
    return edit


def drop_layer_key(key):
    def edit(meta):
        del meta["layers"][0][key]
        return meta
    return edit


def set_optimizer(key, value):
    def edit(meta):
        meta["optimizer"][key] = value
        return meta
    return edit


def set_config(key, value):
    def edit(meta):
        meta["optimizer"]["config"][key] = value
        return meta
    return edit


BAD_META = {
    "not json": lambda m: "{not json",
    "empty text": lambda m: "",
    "a list": lambda m: json.dumps([m]),
    "a number": lambda m: "42",
    "null": lambda m: "null",
    "deeply nested": lambda m: "[" * 100000 + "]" * 100000,
    "deeply nested layers": set_key("layers", json.loads("[" * 500 + "]" * 500)),
    "layers missing": drop_key("layers"),
    "layers empty": set_key("layers", []),
    "layers a dict": set_key("layers", {"n_in": 3}),
    "layers a string": set_key("layers", "dense"),
    "layer a list": set_key("layers", [[3, 4, "relu", True, 0.01]]),
    "layer a number": set_key("layers", [3]),
    "layer missing n_in": drop_layer_key("n_in"),
    "layer missing activation": drop_layer_key("activation"),
    "n_in negative": set_layer(0, "n_in", -3),
    "n_in zero": set_layer(0, "n_in", 0),
    "n_in a string": set_layer(0, "n_in", "3"),
    "n_in a float": set_layer(0, "n_in", 3.0),
    "n_in a bool": set_layer(0, "n_in", True),
    "n_in null": set_layer(0, "n_in", None),
    "n_out huge": set_layer(1, "n_out", 10**30),
    "sizes do not chain": set_layer(1, "n_in", 5),
    "unknown activation": set_layer(0, "activation", "swish"),
    "activation a list": set_layer(0, "activation", ["relu"]),
    "bias a string": set_layer(0, "bias", "yes"),
    "alpha NaN": set_layer(0, "alpha", float("nan")),
    "alpha a string": set_layer(0, "alpha", "0.01"),
    "dtype missing": drop_key("dtype"),
    "dtype float16": set_key("dtype", "float16"),
    "dtype int32": set_key("dtype", "int32"),
    "dtype a number": set_key("dtype", 32),
    "dtype a list": set_key("dtype", ["float32"]),
    "dtype nonsense": set_key("dtype", "no such type"),
    "seed negative": set_key("seed", -1),
    "seed a string": set_key("seed", "0"),
    "seed a float": set_key("seed", 0.5),
    "steps negative": set_key("steps", -1),
    "steps a string": set_key("steps", "2"),
    "steps a float": set_key("steps", 2.5),
    "steps null": set_key("steps", None),
    "steps missing": drop_key("steps"),
    "deterministic a string": set_key("deterministic", "yes"),
    "rng missing": drop_key("rng"),
    "rng a number": set_key("rng", 5),
    "rng another generator": set_key("rng", {"bit_generator": "MT19937", "state": {}}),
    "rng state missing": set_key("rng", {"bit_generator": "PCG64"}),
    "rng state too big": set_key("rng", {"bit_generator": "PCG64", "state": {"state": 10**60, "inc": 1},
                                         "has_uint32": 0, "uinteger": 0}),
    "rng state negative": set_key("rng", {"bit_generator": "PCG64", "state": {"state": -1, "inc": 1},
                                          "has_uint32": 0, "uinteger": 0}),
    "rng state a string": set_key("rng", {"bit_generator": "PCG64", "state": {"state": "a", "inc": 1},
                                          "has_uint32": 0, "uinteger": 0}),
    "optimizer missing": drop_key("optimizer"),
    "optimizer unknown": set_optimizer("type", "RMSprop"),
    "optimizer a string": set_key("optimizer", "Adam"),
    "optimizer a list": set_key("optimizer", ["Adam"]),
    "optimizer type a list": set_optimizer("type", ["Adam"]),
    "optimizer config a number": set_optimizer("config", 5),
    "optimizer config a string": set_optimizer("config", "lr=0.1"),
    "optimizer config a list": set_optimizer("config", [["lr", 0.1]]),
    "optimizer unknown setting": set_config("momentum", 0.9),
    "optimizer lr negative": set_config("lr", -0.1),
    "optimizer lr a string": set_config("lr", "0.1"),
    "optimizer lr NaN": set_config("lr", float("nan")),
    "optimizer betas a number": set_config("betas", 5),
    "optimizer betas a string": set_config("betas", "ab"),
    "optimizer betas three": set_config("betas", [0.9, 0.99, 0.999]),
    "optimizer betas null": set_config("betas", None),
    "optimizer betas above one": set_config("betas", [0.9, 1.5]),
    "schedule a string": set_optimizer("schedule", "Cosine"),
    "schedule unknown": set_optimizer("schedule", {"type": "Evil", "settings": {}}),
    "schedule type a list": set_optimizer("schedule", {"type": ["Cosine"], "settings": {}}),
    "schedule settings a list": set_optimizer("schedule", {"type": "Cosine", "settings": [1.0, 10]}),
    "schedule unknown setting": set_optimizer("schedule", {"type": "Exponential",
                                                           "settings": {"lr": 0.1, "gamma": 0.9, "eval": 1}}),
    "schedule setting missing": set_optimizer("schedule", {"type": "Cosine", "settings": {"lr": 0.1}}),
    "schedule lr negative": set_optimizer("schedule", {"type": "Exponential", "settings": {"lr": -1, "gamma": 0.9}}),
    "schedule warmup too long": set_optimizer("schedule", {"type": "Cosine",
                                                           "settings": {"lr": 0.1, "total": 5, "warmup": 5}}),
    "schedule observed strings": set_optimizer("schedule", {"type": "ReduceOnPlateau", "settings": {"lr": 0.1},
                                                            "observed": ["0.5"]}),
    "loss unknown": set_key("loss", "hinge"),
    "loss a list": set_key("loss", ["mse"]),
    "loss not for the output layer": set_key("loss", "bce"),
    "classes for mse": set_key("classes", ["a", "b"]),
    "classes a dict": lambda m: dict(m, loss="softmax_ce", classes={"a": 1, "b": 2}),
    "classes a string": lambda m: dict(m, loss="softmax_ce", classes="ab"),
    "classes too many": lambda m: dict(m, loss="softmax_ce", classes=["a", "b", "c"]),
    "classes repeated": lambda m: dict(m, loss="softmax_ce", classes=["a", "a"]),
    "classes mixed": lambda m: dict(m, loss="softmax_ce", classes=["a", 1]),
    "classes nested": lambda m: dict(m, loss="softmax_ce", classes=[["a"], ["b"]]),
    "classes NaN": lambda m: dict(m, loss="softmax_ce", classes=[0.5, float("nan")]),
    "extra a list": set_key("extra", [1, 2]),
    "extra a string": set_key("extra", "notes"),
}


@pytest.mark.parametrize("case", list(BAD_META))
def test_malformed_metadata_is_refused(tmp_path, case):
    assert_refused(with_meta(tmp_path, BAD_META[case]))


def test_a_huge_metadata_string_is_refused(tmp_path):
    assert_refused(with_meta(tmp_path, lambda m: json.dumps(m) + " " * 5_000_000), "metadata")


def test_the_backend_argument_is_checked_as_the_callers_mistake(tmp_path):
    good_checkpoint(tmp_path / "good.npz")
    with pytest.raises(ValueError, match="backend") as info:
        gpubp.load(tmp_path / "good.npz", backend="tpu")
    assert REFUSED not in str(info.value)


def test_load_never_enables_pickles(tmp_path, monkeypatch):
    calls = []
    real_load = np.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("allow_pickle", False))
        return real_load(*args, **kwargs)
    monkeypatch.setattr(np, "load", spy)
    good_checkpoint(tmp_path / "good.npz")
    gpubp.load(tmp_path / "good.npz", backend="numpy")
    assert not any(calls)
    with open(serialize.__file__) as source:
        assert "allow_pickle=True" not in source.read()


def patched_params_headers(tmp_path, flag_bits=0, method=None):
    """A copy of a good checkpoint with the zip headers of params.npy changed: flag bits or'ed in, the
    compression method replaced (offsets from the zip specification, APPNOTE 4.3.7 and 4.3.12)."""
    good_checkpoint(tmp_path / "good.npz")
    data = bytearray((tmp_path / "good.npz").read_bytes())
    at = data.find(b"params.npy")
    while at != -1:
        if data[at - 30:at - 26] == b"PK\x03\x04":      # local file header: flags at 6, method at 8
            flags, method_at = at - 30 + 6, at - 30 + 8
        elif data[at - 46:at - 42] == b"PK\x01\x02":    # central directory entry: flags at 8, method at 10
            flags, method_at = at - 46 + 8, at - 46 + 10
        else:
            flags = None
        if flags is not None:
            data[flags] |= flag_bits
            if method is not None:
                data[method_at:method_at + 2] = method.to_bytes(2, "little")
        at = data.find(b"params.npy", at + 1)
    path = tmp_path / "patched.npz"
    path.write_bytes(bytes(data))
    return path


def test_an_encrypted_member_is_refused(tmp_path):
    assert_refused(patched_params_headers(tmp_path, flag_bits=0x1), "params")


def test_an_unknown_compression_is_refused(tmp_path):
    assert_refused(patched_params_headers(tmp_path, method=99), "params")     # 99: AES, which zipfile lacks
