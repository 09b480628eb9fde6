"""Other libraries' device arrays in, the backend's device arrays out (issue 15, part 4).

The GPU backends take any array that offers __cuda_array_interface__ or DLPack on their device (torch.cuda, jax,
cupy) for X and y: a view when dtype and layout fit, else one device-to-device copy, never a trip through the
host. predict(X, device=True) returns the backend's own device array.

Without a GPU this runs on stand-ins:
  - ForeignDeviceArray plays another library's GPU array: its memory is a numpy buffer, and it offers only
    __cuda_array_interface__ and __dlpack_device__ (CUDA, device 0); no __array__, so any path that reads it
    through numpy (a host round trip on a GPU) fails;
  - the cupy backend on the CPU emulator (tests/cuda_emulation: the real kernels, numpy arrays as device
    arrays), its asarray / from_dlpack taught to view such an array's memory as CuPy's do;
  - the numba backend under the CUDA simulator (marked numba), with numba's as_cuda_array (absent in the
    simulator) likewise a view.
The same flows with torch.cuda tensors on a real GPU are the tests marked gpu at the end.
"""
import ctypes

import numpy as np
import pytest

import gpubp
from gpubp.backends import cupy_backend as cb

from helpers import make_data, make_net


def view_of_interface(interface):
    """The numpy view of the memory a __cuda_array_interface__ describes (on the stand-ins, device = host)."""
    dtype = np.dtype(interface["typestr"])
    shape, strides = tuple(interface["shape"]), interface.get("strides")
    count = (sum((n - 1) * s for n, s in zip(shape, strides)) // dtype.itemsize + 1) if strides else int(np.prod(shape))
    buffer = (ctypes.c_char * (count * dtype.itemsize)).from_address(interface["data"][0])
    flat = np.frombuffer(buffer, dtype, count)
    return np.lib.stride_tricks.as_strided(flat, shape, strides) if strides else flat.reshape(shape)


class ForeignDeviceArray:
    """Another library's GPU array, on the CPU (see the module docstring)."""

    def __init__(self, array, device=0, interface=True):
        self._array, self._device = array, device
        if not interface:
            self.__class__ = DLPackOnlyArray

    @property
    def __cuda_array_interface__(self):
        a = self._array
        return {"shape": a.shape, "typestr": a.dtype.str, "data": (a.ctypes.data, False), "version": 3,
                "strides": None if a.flags.c_contiguous else a.strides}

    def __dlpack_device__(self):
        return (2, self._device)      # kDLCUDA


class DLPackOnlyArray(ForeignDeviceArray):
    __cuda_array_interface__ = None   # DLPack only


class RefusingArray:
    """A tensor that requires grad: it has the interface but refuses to give it, as torch does."""

    @property
    def __cuda_array_interface__(self):
        raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad")


@pytest.fixture
def emulated(emulator, monkeypatch):
    """The cupy backend on the CPU emulator, whose asarray and from_dlpack view a ForeignDeviceArray's memory
    (CuPy's do the same with device memory) and count how often they were asked to."""
    from cuda_emulation import emulator as emulator_module
    for module, name, value in emulator_module.patches(emulator, 132):
        monkeypatch.setattr(module, name, value)
    fake, calls = cb.cp, {"asarray": 0, "from_dlpack": 0}
    numpy_asarray = fake.asarray

    def asarray(x, dtype=None):
        interface = getattr(x, "__cuda_array_interface__", None)
        if interface is None:
            return numpy_asarray(x, dtype)
        calls["asarray"] += 1
        view = view_of_interface(interface)
        return view if dtype is None else view.astype(dtype, copy=False)

    def from_dlpack(x):
        calls["from_dlpack"] += 1
        return x._array

    monkeypatch.setattr(fake, "asarray", asarray)
    monkeypatch.setattr(fake, "from_dlpack", from_dlpack, raising=False)
    backend = cb.CupyBackend()
    backend.calls = calls
    return backend


# ---- the cupy backend, emulated --------------------------------------------------------------------------------
def test_adopt_views_foreign_device_memory(emulated, rng):
    host = rng.standard_normal((6, 3)).astype(np.float32)
    view = emulated.adopt(ForeignDeviceArray(host), "X")
    assert emulated.is_device_array(view) and np.shares_memory(view, host)
    view = emulated.adopt(ForeignDeviceArray(host, interface=False), "X")
    assert emulated.calls["from_dlpack"] == 1 and np.shares_memory(view, host)
    listed = [[1.0, 2.0]]
    assert emulated.adopt(listed, "X") is listed and emulated.adopt(host, "X") is host   # not foreign: unchanged


def test_foreign_arrays_elsewhere_or_unshareable_are_refused(emulated, rng):
    net = make_net([3, 4, 2], backend=emulated, dtype="float32")
    with pytest.raises(ValueError, match="X: on CUDA device 1.*device 0"):
        net.predict(ForeignDeviceArray(np.zeros((2, 3), np.float32), device=1))
    with pytest.raises(TypeError, match="X: a RefusingArray that cannot be shared.*detach"):
        net.predict(RefusingArray())


@pytest.mark.parametrize("loss", ["mse", "softmax_ce"])
def test_training_on_foreign_arrays_equals_training_on_numpy(emulated, rng, loss):
    """train_step, fit (with validation data) and predict on stand-ins give the bits numpy inputs give. (On the
    emulator numpy arrays are device arrays too, so the counters cannot tell the two apart: that the stand-ins
    never went through the host is shown by their having no __array__.)"""
    X, y = make_data(rng, 24, 3, 2, loss)
    X = X.astype(np.float32)
    y = y.astype(np.float32) if loss == "mse" else y
    nets = [make_net([3, 4, 2], loss=loss, backend=cb.CupyBackend(), dtype="float32", seed=1) for _ in range(2)]
    results = []
    for net, wrap in zip(nets, [lambda a: a, ForeignDeviceArray]):
        opt = gpubp.SGD(net, lr=0.1, momentum=0.9)
        losses = [net.train_step(wrap(X[:8]), wrap(y[:8]), loss=loss, optimizer=opt)]
        history = net.fit(wrap(X), wrap(y), loss=loss, epochs=2, batch_size=8, validation_data=(wrap(X), wrap(y)))
        results.append((losses, dict(history), net.predict(wrap(X))))
    (np_losses, np_history, np_out), (dev_losses, dev_history, dev_out) = results
    assert dev_losses == np_losses and dev_history == np_history
    np.testing.assert_array_equal(dev_out, np_out)
    assert emulated.calls["asarray"] >= 5      # each stand-in was viewed: train_step's, fit's, validation's, predict's


def test_a_foreign_array_that_does_not_fit_is_copied_on_the_device(emulated, rng, monkeypatch):
    """float64 into a float32 model, or a transposed (non-contiguous) array: one device-to-device copy."""
    net = make_net([3, 4, 2], backend=emulated, dtype="float32")
    X = rng.standard_normal((5, 3))
    expected = net.predict(X.astype(np.float32))
    copies = []
    real_copy_into = emulated.copy_into
    monkeypatch.setattr(emulated, "copy_into", lambda dst, src: (copies.append(type(src)), real_copy_into(dst, src)))
    h2d = emulated.counters["h2d"]
    for foreign in (ForeignDeviceArray(X), ForeignDeviceArray(np.asfortranarray(X.astype(np.float32)))):
        copies.clear()
        np.testing.assert_allclose(net.predict(foreign), expected, rtol=1e-6)
        assert copies == [np.ndarray]        # one copy, from a device array (cupy.ndarray here)
    assert emulated.counters["h2d"] == h2d


def test_predict_device_returns_the_backend_array(emulated, rng):
    net = make_net([3, 4, 2], backend=emulated, dtype="float32")
    X1, X2 = (rng.standard_normal((7, 3)).astype(np.float32) for _ in range(2))
    d2h = emulated.counters["d2h"]
    out1 = net.predict(ForeignDeviceArray(X1), device=True)
    assert emulated.counters["d2h"] - d2h <= 1   # at most the finiteness check's flag: the output stays put
    out2 = net.predict(X2, device=True, batch_size=3)          # in chunks, into one device array
    assert isinstance(out1, cb.cp.ndarray) and out1.shape == (7, 2)
    np.testing.assert_array_equal(out1, net.predict(X1))       # not the workspace: the later call left it alone
    np.testing.assert_array_equal(out2, net.predict(X2))


def test_predict_device_on_numpy_and_bad_flag(rng):
    net = make_net([3, 2], backend="numpy")
    X = rng.standard_normal((4, 3))
    out = net.predict(X, device=True)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, net.predict(X))
    with pytest.raises(TypeError, match="device"):
        net.predict(X, device="yes")


# ---- the numba backend, under the simulator --------------------------------------------------------------------
@pytest.fixture
def simulated_numba(monkeypatch):
    from gpubp.backends import numba_backend as nb
    ok, reason = nb.available()
    if not ok or not nb.SIMULATOR:
        pytest.skip(f"needs the numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1): {reason}")
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
    # numba's as_cuda_array makes a device-array view of the interface's memory; the simulator has none
    monkeypatch.setattr(nb.cuda, "as_cuda_array", lambda x, sync=True: FakeCUDAArray(
        view_of_interface(x.__cuda_array_interface__)), raising=False)
    # ... and its device has no id (a real one's is the CUDA ordinal); the stand-ins are on device 0
    monkeypatch.setattr(type(nb.cuda.get_current_device()), "id", 0, raising=False)
    return nb.NumbaBackend()


@pytest.mark.numba
def test_numba_takes_foreign_arrays_and_returns_device_arrays(simulated_numba, rng):
    from numba import cuda
    be = simulated_numba
    X, y = make_data(rng, 6, 3, 2, "mse")
    X, y = X.astype(np.float32), y.astype(np.float32)
    memory = X.copy()
    view = be.adopt(ForeignDeviceArray(memory), "X")
    memory[0, 0] = 42.0                                   # a view: it sees the change
    assert cuda.devicearray.is_cuda_ndarray(view) and view.copy_to_host()[0, 0] == 42.0
    nets = [make_net([3, 4, 2], backend=be if i else "numpy", dtype="float32", seed=2) for i in range(2)]
    for net, wrap in zip(nets, [lambda a: a, ForeignDeviceArray]):
        gpubp.SGD(net, lr=0.1)
        net.train_step(wrap(X), wrap(y), loss="mse")
    np.testing.assert_allclose(nets[1].predict(ForeignDeviceArray(X)), nets[0].predict(X), rtol=1e-5, atol=1e-6)
    out = nets[1].predict(ForeignDeviceArray(X), device=True)
    assert cuda.devicearray.is_cuda_ndarray(out)
    np.testing.assert_allclose(out.copy_to_host(), nets[0].predict(X), rtol=1e-5, atol=1e-6)
    # float64 for a float32 model, and a transposed layout: copied on the device (numba_interop_kernels)
    for foreign in (ForeignDeviceArray(X.astype(np.float64)), ForeignDeviceArray(np.asfortranarray(X))):
        expected = nets[0].predict(X)
        before = dict(be.counters)
        np.testing.assert_allclose(nets[1].predict(foreign), expected, rtol=1e-5, atol=1e-6)
        # up: the finiteness check's 4-byte flag; down: that flag and the predictions; never the input
        assert (be.counters["h2d"] - before["h2d"], be.counters["d2h"] - before["d2h"]) == (1, 2)
    labels = np.array([0, 1, 1, 0, 1, 0], np.int32)      # int32 labels (torch's default is int64)
    softmax = make_net([3, 2], loss="softmax_ce", backend=be, dtype="float32")
    gpubp.SGD(softmax, lr=0.1)
    reference = make_net([3, 2], loss="softmax_ce", backend="numpy", dtype="float32")
    gpubp.SGD(reference, lr=0.1)
    assert softmax.train_step(ForeignDeviceArray(X), ForeignDeviceArray(labels), loss="softmax_ce") == \
        pytest.approx(reference.train_step(X, labels, loss="softmax_ce"), rel=1e-5)
    with pytest.raises(TypeError, match="X: a DLPackOnlyArray.*cupy backend"):
        nets[1].predict(ForeignDeviceArray(X, interface=False))


# ---- a real GPU: torch.cuda tensors ------------------------------------------------------------------------------
def _gpu_backends():
    torch = pytest.importorskip("torch", reason="torch is not installed (pip install gpubp[torch])")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    usable = [name for name, (ok, why) in gpubp.availability().items() if ok and name != "numpy"
              and "simulator" not in why]
    if not usable:
        pytest.skip("no GPU backend can run here")
    return torch, usable


def _pointer(array):
    """The device address of a backend array (cupy: .data.ptr; numba: its device pointer)."""
    data = getattr(array, "data", None)
    return data.ptr if hasattr(data, "ptr") else array.device_ctypes_pointer.value


@pytest.mark.gpu
def test_torch_cuda_tensors_are_used_in_place():
    torch, usable = _gpu_backends()
    for name in usable:
        net = make_net([3, 16, 2], loss="softmax_ce", backend=name, dtype="float32", seed=0)
        twin = make_net([3, 16, 2], loss="softmax_ce", backend=name, dtype="float32", seed=0)
        be = net.backend
        X = torch.randn(64, 3, device="cuda")
        assert _pointer(be.adopt(X, "X")) == X.data_ptr()                  # a view, no copy
        before = be.counters["h2d"]
        out = net.predict(X, device=True)
        assert be.is_device_array(out) and be.counters["h2d"] - before <= 1   # numba's 4-byte flag at most
        np.testing.assert_allclose(be.to_numpy(out), net.predict(X.cpu().numpy()), rtol=1e-6, atol=1e-7)
        # float64 and a transposed layout: one device-to-device copy, no host-to-device one
        X64 = torch.randn(3, 64, device="cuda", dtype=torch.float64).T
        before = be.counters["h2d"]
        np.testing.assert_allclose(net.predict(X64), net.predict(X64.cpu().numpy()), rtol=1e-5, atol=1e-6)
        assert be.counters["h2d"] - before <= 2    # the numpy call's upload, and numba's flag at most
        labels = torch.randint(0, 2, (64,), device="cuda")
        gpubp.SGD(net, lr=0.05)
        gpubp.SGD(twin, lr=0.05)
        loss = net.train_step(X, labels, loss="softmax_ce")
        assert loss == pytest.approx(twin.train_step(X.cpu().numpy(), labels.cpu().numpy(), loss="softmax_ce"),
                                     rel=1e-6)
        with pytest.raises(TypeError, match="X: .*detach"):
            net.predict(X.clone().requires_grad_(True))


@pytest.mark.gpu
def test_jax_arrays_are_used_in_place():
    jax = pytest.importorskip("jax", reason="jax is not installed")
    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("jax sees no GPU")
    import jax.numpy as jnp
    net = make_net([3, 8, 2], backend="auto", dtype="float32")
    if net.backend.name == "numpy":
        pytest.skip("no GPU backend can run here")
    X = jnp.asarray(np.random.default_rng(0).standard_normal((16, 3)), dtype=jnp.float32)
    before = net.backend.counters["h2d"]
    out = net.predict(X)
    assert net.backend.counters["h2d"] - before <= 1    # numba's 4-byte flag at most; X is read in place
    np.testing.assert_allclose(out, net.predict(np.asarray(X)), rtol=1e-6)
