"""The flat buffers' layout: every per-layer view starts 128-byte aligned (so the GEMMs' 16-byte loads apply to
every layer), the padding stays zero through training, and checkpoints keep the packed format (a file written
without padding loads, and a saved file holds exactly the parameters)."""
import math

import numpy as np
import pytest

import gpubp
from gpubp import params as flat_params
from helpers import make_data, make_net

ARCHITECTURES = [[13, 7, 3], [1, 1], [5, 33, 1, 7], [784, 256, 10], [3, 2, 2, 2, 2, 5]]


@pytest.mark.parametrize("sizes", ARCHITECTURES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_view_of_every_layer_is_128_byte_aligned(sizes, dtype):
    net = make_net(sizes, dtype=dtype)
    itemsize = np.dtype(dtype).itemsize
    for i, name, shape, offset in net.layout.entries:
        assert offset * itemsize % 128 == 0, (i, name, offset)
    # and on the arrays themselves, for the flat buffers of a train step (numpy backs them with its own
    # allocation, whose start is aligned at least to 16 bytes: the views keep that alignment)
    for flat in (net.params, net.grads):
        base = flat.ctypes.data
        for views in net.layout.views(net.backend, flat):
            for view in views.values():
                assert (view.ctypes.data - base) % 128 == 0 and view.ctypes.data % 16 == 0
    assert net.layout.n_params == sum(math.prod(s) for _, _, s, _ in net.layout.entries)
    assert net.layout.size >= net.layout.n_params


def test_13_7_3_puts_w1_at_an_aligned_offset():
    # the example: packed, W1 sat at element 98 (13*7 + 7), 392 bytes in, not 16-byte aligned
    layout = make_net([13, 7, 3], dtype="float32").layout
    offsets = {(i, name): offset for i, name, _, offset in layout.entries}
    assert offsets == {(0, "W"): 0, (0, "b"): 96, (1, "W"): 128, (1, "b"): 160}


@pytest.mark.parametrize("make_opt", [lambda n: gpubp.SGD(n, lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True),
                                      lambda n: gpubp.Adam(n, lr=0.05, weight_decay=0.1)], ids=["sgd", "adam"])
def test_padding_stays_zero_through_training(make_opt, rng):
    net = make_net([13, 7, 3], loss="softmax_ce", dtype="float32")
    opt = make_opt(net)
    X, y = make_data(rng, 50, 13, 3, "softmax_ce")
    net.fit(X, y, "softmax_ce", opt, epochs=2, batch_size=16)
    padding = np.ones(net.layout.size, bool)
    for _, _, shape, offset in net.layout.entries:
        padding[offset:offset + math.prod(shape)] = False
    assert padding.any()
    for flat in [net.params, net.grads, *opt.state.values()]:
        assert not np.asarray(flat)[padding].any()


def test_pack_and_unpack_are_inverses(rng):
    layout = make_net([5, 33, 1, 7]).layout
    packed = rng.standard_normal(layout.n_params)
    flat = layout.unpack(packed)
    assert flat.shape == (layout.size,)
    np.testing.assert_array_equal(layout.pack(flat), packed)
    assert layout.layer_of(layout.entries[-1][3]) == 2 and layout.layer_of(layout.size - 1) == 2


def test_checkpoint_holds_the_packed_parameters(tmp_path, rng):
    net = make_net([13, 7, 3], loss="softmax_ce", dtype="float32")
    opt = gpubp.Adam(net, lr=0.01)
    X, y = make_data(rng, 20, 13, 3, "softmax_ce")
    net.train_step(X, y, "softmax_ce", opt)
    net.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as saved:
        packed = np.concatenate([np.concatenate([p["W"].ravel(), p["b"]]) for p in net.get_params()])
        np.testing.assert_array_equal(saved["params"], packed)
        assert saved["opt.exp_avg"].shape == (net.layout.n_params,)


def test_a_checkpoint_written_without_padding_loads(tmp_path, rng):
    # A file of the packed format as every earlier version wrote it: parameters one after another.
    net = make_net([13, 7, 3], loss="softmax_ce", dtype="float32")
    opt = gpubp.SGD(net, lr=0.1, momentum=0.9)
    X, y = make_data(rng, 20, 13, 3, "softmax_ce")
    net.train_step(X, y, "softmax_ce", opt)
    net.save(tmp_path / "new.npz")
    with np.load(tmp_path / "new.npz") as saved:
        arrays = dict(saved)
    params = net.get_params()
    arrays["params"] = np.concatenate([np.concatenate([p["W"].ravel(), p["b"]]) for p in params])
    np.savez(tmp_path / "old.npz", **arrays)
    loaded = gpubp.load(tmp_path / "old.npz", backend="numpy")
    for a, b in zip(loaded.get_params(), params):
        np.testing.assert_array_equal(a["W"], b["W"])
        np.testing.assert_array_equal(a["b"], b["b"])
    np.testing.assert_array_equal(loaded.optimizer.state_arrays()["momentum_buffer"],
                                  opt.state_arrays()["momentum_buffer"])
    np.testing.assert_array_equal(loaded.predict(X), net.predict(X))
    assert flat_params.ALIGN * 4 == 128
