"""The numba backend: the kernel set of SPEC section 3 as numba.cuda.jit kernels (numba_kernels.py), launched on
device-resident arrays. Runs on an NVIDIA GPU, or on the CPU under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1,
set before numba is imported), which is how CI tests it.

The training loop's ops (guarded updates, gradient guard, step bookkeeping, batch gathering) are the kernels of
numba_loop_kernels.py: a step launches them in stream order and never waits for the host. numba has no CUDA
graphs, so run_step launches every step eagerly (the base class's default); `counters` counts every host<->device
copy and wait.

Mixed precision (issue 12, the contract in base.py): every precision, with no tensor cores (numba.cuda has no
mma: products are float32 FMAs). storage_dtype is float16 for fp16 and uint16 bfloat16 bits for bf16 (numba-cuda
has no bfloat16 array type, and none under the simulator); each GEMM kernel is built for the kinds of its arrays
(numba_kernels: a float32 operand rounded to the precision as it is loaded, a 16-bit one read exactly, an output
stored in its dtype), picked here from the arrays' dtypes and `precision`. fp32 launches the fp32 kernels as
before. fp16's loss scale: loss_grad's `scale`, unscale_gradients and update_scale (numba_loop_kernels), on the
device.

Device arrays are numba DeviceNDArrays; any array with __cuda_array_interface__ (CuPy's) is used in place.
Ops write into the buffers they are given; the few scratch buffers (a loss row vector, a flag, a dummy bias)
are made once per shape and kept, so a train step at a fixed batch size allocates nothing after its first.
"""
import functools
import math
import types
import warnings

import numpy as np

from .base import DLPACK_CUDA, Backend, cuda_array_interface, dlpack_device

try:
    from numba import cuda
    from numba.cuda import config as _cuda_config
    SIMULATOR = bool(_cuda_config.ENABLE_CUDASIM)
except ImportError:   # numba-cuda missing: available() says so
    cuda = None
    SIMULATOR = False

# Elementwise launches: grid-stride loops. The simulator runs one OS thread per CUDA thread and one block at a
# time, so there a launch is kept to one small block; on a GPU, enough blocks to fill it.
THREADS = 32 if SIMULATOR else 256
MAX_BLOCKS = 1 if SIMULATOR else 4096


@functools.cache
def available():
    """(usable here, why or why not), probed once."""
    return _probe()


def _probe():
    if cuda is None:
        return False, "numba-cuda is not installed: pip install numba-cuda"
    if SIMULATOR:
        return True, "numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1): correct but slow, for tests"
    try:
        if not cuda.is_available():
            return False, ("no CUDA GPU/driver found (numba.cuda.is_available() is False); set "
                           "NUMBA_ENABLE_CUDASIM=1 to run under the simulator, slowly")
        from . import numba_kernels
        flag = cuda.to_device(np.zeros(1, np.int32))
        numba_kernels.nonfinite_flag_kernel[1, 1](cuda.to_device(np.array([np.inf])), flag)
        if flag.copy_to_host()[0] != 1:
            return False, "a probe kernel ran but gave a wrong result"
    except Exception as exc:   # a driver, toolkit or compiler problem: say which
        return False, f"numba could not compile and launch a probe kernel ({type(exc).__name__}: {exc})"
    return True, f"numba.cuda on {cuda.get_current_device().name}"


class _QuietLaunch:
    """A simulated kernel with numpy's floating-point warnings off. Under the simulator a kernel runs as Python on
    numpy scalars, and an overflow, which a GPU turns silently into inf as IEEE 754 says, raises numpy's
    RuntimeWarning instead (an error where warnings are errors). The network reports non-finite values itself."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, config):
        launch = self.kernel[config]

        def run(*args):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                launch(*args)
        return run


def _launchable(namespace):
    """The kernels of a module or namespace, wrapped in _QuietLaunch under the simulator (as they are otherwise)."""
    if not SIMULATOR:
        return namespace
    return types.SimpleNamespace(**{name: _QuietLaunch(value) if hasattr(value, "__getitem__") and callable(value)
                                    else value for name, value in vars(namespace).items()})


# ---- launch arithmetic: plain integers, tested without a GPU (tests/test_numba_backend.py) -------------------
MAX_GRID_X = 2 ** 31 - 1   # CUDA's limits on grid.x, and on grid.y and grid.z
MAX_GRID_YZ = 65535


def ceil_div(a, b):
    return -(-a // b)


def gemm_grid(tile, M, N):
    """The grid of a tiled GEMM launch that writes C (M, N) in tile = (BM, BN) blocks: (ceil(M/BM), ceil(N/BN)),
    as the cupy backend's gemm_grid. The rows of C go on grid.x (up to 2³¹ − 1 blocks): they are the batch in
    dense_forward and input_grad, and on grid.y (65535 blocks) a launch would stop at 65535·BM rows."""
    return (ceil_div(M, tile[0]), ceil_div(N, tile[1]))


def grid_stride_blocks(size, threads=None, max_blocks=None):
    """The grid of a 1-D grid-stride launch over `size` items: enough blocks of `threads` for one item each,
    at most `max_blocks` (each thread then loops), at least 1."""
    threads = THREADS if threads is None else threads
    max_blocks = MAX_BLOCKS if max_blocks is None else max_blocks
    return max(1, min(max_blocks, ceil_div(size, threads)))


def _gemm_grid(M, N):
    from .numba_kernels import BM, BN
    return gemm_grid((BM, BN), M, N)


class NumbaBackend(Backend):
    name = "numba"
    # every precision, on any GPU numba compiles for: fp16/bf16 stored 16-bit, products in float32 FMAs (no
    # tensor cores: numba.cuda has no mma), tf32 as operands rounded to tf32 and multiplied in float32
    PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
    real_gpu = not SIMULATOR   # "auto" never picks the simulator

    def __init__(self, deterministic=False):
        super().__init__(deterministic)
        from . import numba_kernels, numba_loop_kernels
        self.k = _launchable(numba_kernels)
        self.loop = _launchable(numba_loop_kernels)
        self._scratch = {}
        self._kernels = {}
        self._update_kernels = {}
        self._interop = None      # numba_interop_kernels, loaded when another library's array first needs it

    def _scratch_buffer(self, key, shape, dtype):
        buf = self._scratch.get(key)
        if buf is None or buf.shape != tuple(shape) or buf.dtype != np.dtype(dtype):
            buf = self._scratch[key] = cuda.device_array(shape, dtype)
        return buf

    def _kernel(self, factory, *key):
        """The kernel numba_kernels.<factory>(*key) builds (per dtype and kinds), launchable, made once."""
        kernel = self._kernels.get((factory, key))
        if kernel is None:
            built = getattr(self.k, factory)(*key)
            kernel = self._kernels[(factory, key)] = _launchable(types.SimpleNamespace(kernel=built)).kernel
        return kernel

    # ---- reduced precision (issue 12): which kind each array of a launch is ---------------------------------
    def storage_dtype(self, precision):
        """float32 for fp32/tf32; float16 for fp16 (numba reads and writes it, converting with cvt.rn.f16.f32);
        uint16 bfloat16 bits for bf16 (numba-cuda has no bfloat16 array type that its simulator knows:
        numba.cuda.bf16.bfloat16 is None there; the kernels round by integer RNE, as ml_dtypes does)."""
        from .. import precision as P
        return self.k.STORAGE_DTYPES[P.check_precision(precision)]

    def _operand_kind(self, x, precision):
        """How a GEMM reads operand x at `precision`: a 16-bit stored array exactly (it must be the precision's
        storage), a float32 one rounded to the precision (fp32: as it is, in the model's dtype)."""
        dtype = np.dtype(x.dtype)
        stored = self.k.STORED.get(precision)
        if stored is None:
            raise ValueError(f"precision: expected one of {list(self.k.ROUNDING)}, got {precision!r}")
        if dtype.itemsize == 2:
            if stored == self.k.PLAIN or dtype != self.k.STORAGE_DTYPES[precision]:
                raise ValueError(f"a {dtype} operand is not precision {precision!r}'s storage "
                                 f"(storage_dtype: {self.storage_dtype(precision)})")
            return stored
        if precision != "fp32" and dtype != np.float32:
            raise ValueError(f"precision={precision!r} needs float32 operands (or its storage_dtype), got {dtype}")
        return self.k.ROUNDING[precision]

    def _stored_kind(self, x):
        """How a kernel reads or writes array x outside a GEMM's operand loads: float16 and uint16 (bfloat16
        bits: the only uint16 arrays this backend computes with) as their formats, every other dtype as it is."""
        dtype = np.dtype(x.dtype)
        return self.k.F16 if dtype == np.float16 else self.k.BF16_BITS if dtype == np.uint16 else self.k.PLAIN

    # ---- arrays ------------------------------------------------------------------------------------------
    def empty(self, shape, dtype):
        return cuda.device_array(shape, dtype)

    def zeros(self, shape, dtype):
        out = cuda.device_array(shape, dtype)
        if out.size:   # filled on the device: no host array uploaded
            self.loop.fill_kernel[self.loop.loop_blocks(out.size), self.loop.LOOP_THREADS](out.reshape(out.size), 0)
        return out

    def is_device_array(self, x):
        return cuda.devicearray.is_cuda_ndarray(x) or hasattr(x, "__cuda_array_interface__")

    def adopt(self, x, what="array"):
        if x is None or isinstance(x, np.ndarray) or cuda.devicearray.is_cuda_ndarray(x):
            return x
        device = dlpack_device(x)
        if device is not None and device[0] in DLPACK_CUDA and device[1] != cuda.get_current_device().id:
            raise ValueError(f"{what}: on CUDA device {device[1]}, but this model's arrays are on device "
                             f"{cuda.get_current_device().id}; move it there first")
        if cuda_array_interface(x, what) is not None:
            return cuda.as_cuda_array(x)      # a view of the same device memory, no copy
        if device is not None and device[0] in DLPACK_CUDA:
            raise TypeError(f"{what}: a {type(x).__name__} on the GPU that offers DLPack but not "
                            "__cuda_array_interface__, which the numba backend reads; use the cupy backend")
        return x

    def _device(self, x):
        """A numba view of a device array (CuPy's included, through __cuda_array_interface__, no copy)."""
        if cuda.devicearray.is_cuda_ndarray(x):
            return x
        return cuda.as_cuda_array(x)

    def asarray(self, x, dtype):
        if self.is_device_array(x):
            x = self._device(x)
            if x.dtype == np.dtype(dtype) and x.is_c_contiguous():
                return x
            if x.ndim in (1, 2):
                out = cuda.device_array(x.shape, dtype)
                self._copy_cast(out, x)
                return out
            x = self._to_host(x)   # arrays of 3 or more dimensions never reach the model: the simple path
        self.counters["h2d"] += 1
        return cuda.to_device(np.ascontiguousarray(x, dtype=dtype))

    def copy_into(self, dst, src):
        if self.is_device_array(src):
            src = self._device(src)
            if src.dtype == dst.dtype and src.is_c_contiguous():
                dst.copy_to_device(src)   # device to device: the host does not wait
                return
            if tuple(src.shape) == tuple(dst.shape) and src.ndim in (1, 2):
                self._copy_cast(dst, src)
                return
            src = self._to_host(src)
        self.counters["h2d"] += 1
        dst.copy_to_device(np.ascontiguousarray(np.broadcast_to(np.asarray(src), dst.shape), dtype=dst.dtype))

    def _copy_cast(self, dst, src):
        """dst[...] = src on the device, src of another dtype or layout (numba_interop_kernels): one launch."""
        if self._interop is None:
            from . import numba_interop_kernels
            self._interop = _launchable(numba_interop_kernels)
        kernel = self._interop.copy_cast_1d_kernel if dst.ndim == 1 else self._interop.copy_cast_2d_kernel
        kernel[grid_stride_blocks(dst.size), THREADS](src, dst)

    def to_numpy(self, x):
        return self._to_host(self._device(x))

    def _to_host(self, x):
        """x.copy_to_host(), counted: a synchronous device-to-host copy (the host waits for the device)."""
        self.counters["d2h"] += 1
        self.counters["sync"] += 1
        return x.copy_to_host()

    def view(self, flat, offset, shape):
        return flat[offset:offset + math.prod(shape)].reshape(shape)

    def all_finite(self, x):
        return self.all_finite_many([x])

    def all_finite_many(self, arrays):
        flag = self._scratch_buffer("finite_flag", (1,), np.int32)
        self.counters["h2d"] += 1   # a 4-byte upload next to the wait below (a host read, never inside a step)
        flag.copy_to_device(np.zeros(1, np.int32))
        for x in arrays:
            x = self._device(x)
            if x.size and np.dtype(x.dtype).kind == "f":   # integers (the step count) are always finite
                flat = (x if x.is_c_contiguous() else self.asarray(x, x.dtype)).reshape(x.size)
                self.k.nonfinite_flag_kernel[grid_stride_blocks(flat.size), THREADS](flat, flag)
        return int(self._to_host(flag)[0]) == 0

    def one_hot(self, labels, classes, out):
        if self.is_device_array(labels):
            labels = self._device(labels)
        else:
            self.counters["h2d"] += 1
            labels = cuda.to_device(np.ascontiguousarray(labels, np.int64))
        self.k.one_hot_kernel[grid_stride_blocks(out.shape[0]), THREADS](labels, out)

    def synchronize(self):
        self.counters["sync"] += 1
        cuda.synchronize()

    def free_memory(self):
        # the simulator's "device" is host memory: no budget to keep to there
        return None if SIMULATOR else cuda.current_context().get_memory_info().free

    # ---- the kernel set ----------------------------------------------------------------------------------
    def dense_forward(self, A_prev, W, b, act, alpha, Z, A, precision="fp32"):
        # A_prev (N, in) float32 or storage, W (out, in), b (out,), Z (N, out) model dtype, A (N, out) any
        A_prev, W = self._device(A_prev), self._device(W)
        has_bias = b is not None
        bias = self._device(b) if has_bias else self._scratch_buffer(("no_bias", Z.dtype.name), (1,), Z.dtype)
        kernel = self._kernel("dense_forward_kernel_for", Z.dtype.name, self._operand_kind(A_prev, precision),
                              self._operand_kind(W, precision), self._stored_kind(A))
        kernel[_gemm_grid(Z.shape[0], Z.shape[1]), self.k.GEMM_THREADS](
            A_prev, W, bias, has_bias, act, float(alpha), Z, A)

    def activation_mask(self, dA, Z, A, act, alpha, delta):
        dA, Z, A = self._device(dA), self._device(Z), self._device(A)
        kinds = (self._stored_kind(dA), self._stored_kind(A), self._stored_kind(delta))
        kernel = self.k.activation_mask_kernel if not any(kinds) else self._kernel(
            "activation_mask_kernel_for", *kinds)
        kernel[grid_stride_blocks(delta.size), THREADS](dA, Z, A, act, float(alpha), delta)

    def weight_grad(self, delta, A_prev, dW, db, accumulate=False, precision="fp32"):
        # delta (N, out) and A_prev (N, in): float32 or storage; dW (out, in), db (out,) model dtype
        delta, A_prev = self._device(delta), self._device(A_prev)
        kernel = self._kernel("weight_grad_kernel_for", dW.dtype.name, self._operand_kind(delta, precision),
                              self._operand_kind(A_prev, precision))
        kernel[_gemm_grid(dW.shape[0], dW.shape[1]), self.k.GEMM_THREADS](delta, A_prev, bool(accumulate), dW)
        if db is not None:
            d_kind = self._stored_kind(delta)
            bias_grad = self.k.bias_grad_kernel if d_kind == self.k.PLAIN else self._kernel(
                "bias_grad_kernel_for", d_kind)
            bias_grad[grid_stride_blocks(db.shape[0]), THREADS](delta, bool(accumulate), db)

    def input_grad(self, delta, W, dA_prev, precision="fp32"):
        # the unmasked form: Z_prev/A_prev are never read, any array of the right type will do (dA_prev itself;
        # a float32 stand-in for Z_prev where dA_prev is 16-bit, so that the kernel is the masked one's)
        delta, W = self._device(delta), self._device(W)
        out_kind = self._stored_kind(dA_prev)
        z_dummy = dA_prev if out_kind == self.k.PLAIN else self._scratch_buffer("z_dummy", (1, 1), np.float32)
        self._input_grad(delta, W, False, z_dummy, dA_prev, 0, 0.0, dA_prev, precision)

    def input_grad_masked(self, delta, W, Z_prev, A_prev, act, alpha, delta_prev, precision="fp32"):
        # delta (N, out) storage, W (out, in), Z_prev (N, in) model dtype, A_prev and delta_prev (N, in) storage
        self._input_grad(self._device(delta), self._device(W), True, self._device(Z_prev), self._device(A_prev),
                         act, alpha, delta_prev, precision)

    def round_to_storage(self, src, dst, precision):
        # src (P,) float32, dst (P,) storage_dtype(precision): one launch of the rounding kernel of dst's kind
        src, dst = self._device(src), self._device(dst)
        kind = self._operand_kind(dst, precision)
        if kind not in (self.k.BF16_BITS, self.k.F16) or np.dtype(src.dtype) != np.float32 or src.shape != dst.shape:
            raise TypeError(f"round_to_storage: expected float32 src and dst of {src.shape} in precision "
                            f"{precision!r}'s 16-bit storage, got {src.dtype} and {dst.dtype} {dst.shape}")
        self._kernel("round_to_storage_kernel_for", kind)[grid_stride_blocks(dst.size), THREADS](src, dst)

    def _input_grad(self, delta, W, masked, Z_prev, A_prev, act, alpha, out, precision):
        # the kernel's dtype is the model's: W's, or float32 for a 16-bit stored W (bf16/fp16 models are float32)
        dtype_name = W.dtype.name if np.dtype(W.dtype).itemsize > 2 else "float32"
        kernel = self._kernel("input_grad_kernel_for", dtype_name, self._operand_kind(delta, precision),
                              self._operand_kind(W, precision), self._stored_kind(A_prev), self._stored_kind(out))
        kernel[_gemm_grid(out.shape[0], out.shape[1]), self.k.GEMM_THREADS](
            delta, W, masked, Z_prev, A_prev, act, float(alpha), out)

    def loss_grad(self, loss, act, alpha, Z, y, A, delta, loss_out, scale=None):
        # Z, y, A (N, out) and loss_out (1,) model dtype; delta (N, out) model dtype or storage; scale (1,) float64
        Z, y = self._device(Z), self._device(y)
        N = Z.shape[0]
        rows = self._scratch_buffer(("row_loss", Z.dtype.name), (N,), Z.dtype)
        d_kind = self._stored_kind(delta)
        launch = (grid_stride_blocks(N), THREADS)
        if d_kind == self.k.PLAIN and scale is None:
            self.k.loss_rows_kernel[launch](loss, act, float(alpha), Z, y, A, delta, rows)
        else:
            if np.dtype(Z.dtype) != np.float32:
                raise ValueError(f"a 16-bit delta or a loss scale needs a float32 model, got Z of {Z.dtype}")
            scaled = scale is not None
            scale = self._device(scale) if scaled else self._scratch_buffer("no_scale", (1,), np.float64)
            self._kernel("loss_rows_scaled_kernel_for", d_kind, scaled)[launch](
                loss, act, float(alpha), Z, y, A, delta, rows, scale)
        self._kernel("sum_kernel_for", Z.dtype.name)[1, self.k.REDUCE_THREADS](rows, 1.0 / N, loss_out)

    # ---- the training loop's ops (numba_loop_kernels.py): nothing here waits for the host ---------------------
    # Every scalar that changes from step to step (the step count, the settings, the cursor, the guard) is read
    # by the kernels from device memory. numba has no CUDA graphs: run_step launches each step eagerly.
    def _loop_flags(self):
        """The loop kernels' int64 scratch (numba_loop_kernels.FLAGS_SIZE), made and initialised on the device
        once; every op leaves it as it found it."""
        flags = self._scratch.get("loop_flags")
        if flags is None:
            flags = self._scratch["loop_flags"] = cuda.device_array(self.loop.FLAGS_SIZE, np.int64)
            self.loop.flags_init_kernel[1, 1](flags)
        return flags

    def _guarded_update(self, rule, params, grads, state0, state1, step, hyper, guard):
        """Phase 0 (check, commit in its last block), then phase 1 (apply unless faulted): the same kernel."""
        name = np.dtype(params.dtype).name
        if name not in self._update_kernels:
            self._update_kernels[name] = _launchable(
                types.SimpleNamespace(update=self.loop.update_kernel_for(name))).update
        launch = self._update_kernels[name][self.loop.loop_blocks(params.size), self.loop.LOOP_THREADS]
        args = (rule, params, self._device(grads), state0, state1, step, self._device(hyper), guard,
                self._loop_flags())
        launch(*args, 0)
        launch(*args, 1)

    def sgd_update(self, params, grads, momentum_buf, step, hyper, guard):
        # momentum_buf is passed as both state buffers: the SGD rule reads and writes state 0 only
        self._guarded_update(self.loop.SGD, params, grads, momentum_buf, momentum_buf, step, hyper, guard)

    def adam_update(self, params, grads, m, v, step, hyper, guard):
        self._guarded_update(self.loop.ADAM, params, grads, m, v, step, hyper, guard)

    def gather_rows(self, src, order, cursor, out):
        self.loop.gather_rows_kernel[self.loop.loop_blocks(out.size), self.loop.LOOP_THREADS](
            self._device(src), self._device(order), self._device(cursor), out)

    def advance_cursor(self, cursor, n):
        self.loop.advance_cursor_kernel[1, 1](self._device(cursor), int(n))

    def guard_loss(self, loss_out, guard):
        self.loop.guard_loss_kernel[1, 1](self._device(loss_out), guard)

    def record_step(self, loss, loss_out, A, Y, guard):
        A = self._device(A)
        work = A.size if loss == self.loop.BCE else A.shape[0] if loss == self.loop.SOFTMAX_CE else 0
        self.loop.record_step_kernel[self.loop.loop_blocks(work), self.loop.LOOP_THREADS](
            int(loss), self._device(loss_out), A, self._device(Y), guard, self._loop_flags())

    # ---- fp16 dynamic loss scaling (gpubp/loss_scale.py): nothing here waits for the host either ---------------
    def unscale_gradients(self, loss_out, grads, scaler, guard):
        grads = self._device(grads)
        if np.dtype(grads.dtype) != np.float32:   # loss scaling is fp16's, and fp16 models are float32
            raise ValueError(f"unscale_gradients: expected float32 gradients, got {grads.dtype}")
        self.loop.unscale_gradients_kernel[self.loop.loop_blocks(grads.size), self.loop.LOOP_THREADS](
            self._device(loss_out), grads, self._device(scaler), guard, self._loop_flags())

    def update_scale(self, scaler, guard):
        self.loop.update_scale_kernel[1, 1](self._device(scaler), guard)
