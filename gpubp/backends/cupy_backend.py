"""The cupy backend: the kernel set of SPEC section 3 as hand-written CUDA C (kernels/*.cu), compiled by NVRTC
through cupy.RawModule, launched on CuPy's current stream.

Shapes (rows are samples):  A_prev (N, in)   W (out, in)   b (out,)   Z, A, dA, delta (N, out)

Design, in short (the kernels' header comments have the details):
- One RawModule per (kernels file, device), built on first use from cuda_sources.module_source (headers
  pasted in, so CuPy's on-disk cache sees every edit); both dtypes and both GEMM tiles live in it.
- Scalars are passed as np.int32 / np.int64 / np.float64, matching the kernels' int / long long / double
  parameters (CuPy does no type checking: a Python int would arrive as a long long).
- Ops allocate nothing: scratch (split-K partial sums, loss partial sums) is made once per shape and kept.
- Every op is bit-identical run to run on a given device, so `deterministic` asks for nothing more here: no
  floating-point atomics; the only atomics take the minimum of an index or add integer counts (the guard's
  checks, record_step), whose results do not depend on the order they land in.
- The training loop's ops (gpubp/guard.py) never wait for the host: the guard, the step count, the cursor and
  the optimizer settings live in device memory, updates check before they write (no copies), and a step
  is capturable as a CUDA graph. `counters` count host transfers and waits (base.py).
- run_step captures a whole train step as a CUDA graph (after one eager warm-up call) and replays it.
  Switch it off with GPUBP_CUDA_GRAPHS=0 in the environment or `backend.use_graphs = False`.
- Mixed precision (issue 12, base.py's contract): the GEMM ops take precision="fp32" (today's SIMT kernels,
  float32 or float64) or "tf32" / "bf16" / "fp16" (kernels/dense_tc.cu on the tensor-core core gemm_tc.cuh).
  Stored arrays (storage_dtype): float32 for fp32/tf32; bf16 as raw bits in uint16 (CuPy has no bfloat16);
  fp16 as float16 (CuPy's own, the same bits): so every array's dtype names its format, and loss_grad, which
  takes no precision, knows what to write into δ. A float32 operand of a 16-bit GEMM (W, the master weights;
  X, layer 0's input) is converted first (to_storage_kernel, RNE) into scratch kept per role and size; a 16-bit
  one is read as it is (a network's W: round_to_storage makes every layer's at once, once per forward).
  The fp16 loss scaler (loss_grad's scale, unscale_gradients, update_scale: kernels/loss_scale.cu) lives in
  device memory like the guard: no host synchronisation, capturable.
"""
import functools
import math
import os

import numpy as np

try:
    import cupy as cp
    _IMPORT_ERROR = None
except ImportError as exc:  # the module still imports, so available() can say why
    cp = None
    _IMPORT_ERROR = exc

from .. import fused
from .. import guard as G
from .. import loss_scale as LS
from .. import losses
from .. import precision as P
from . import cuda_sources
from .base import DLPACK_CUDA, Backend, cuda_array_interface, dlpack_device

_THREADS = 256           # block size of every launch (the GEMM tiles are 256 threads too)
_LOSS_MAX_BLOCKS = 1024  # loss_grad_kernel's grid is at most this: the size of its partial-sum scratch
_MAX_SLICES = 64         # split-K: at most this many slices of the batch in weight_grad
_MIN_SLICE_ROWS = 256    # ... each of at least this many rows
_UPDATE_CHECK, _UPDATE_APPLY = 0, 1   # the phases of a guarded update (kernels/optim.cu)
_NO_INDEX = 2**62        # kernels/guard.cuh GUARD_NO_INDEX: "no bad element" in the bad-index scratch
_BAD_INDEX_SLOTS = 4     # a guarded update's gradient, θ, state 0, state 1 (optim.cu; the fp16 unscale uses slot 0)
_TC_TILE = (128, 128, 32)   # gemm_tc.cuh's block tile (BM, BN) and a K step that suits every precision (BK 32/16)
# 16-bit stored arrays: bf16 as raw bits (CuPy has no bfloat16), fp16 as float16 (the same bits); see storage_dtype
_NARROW_DTYPES = {"bf16": np.dtype(np.uint16), "fp16": np.dtype(np.float16)}
_FORMAT_OF_DTYPE = {np.dtype(np.float32): "fp32", np.dtype(np.uint16): "bf16", np.dtype(np.float16): "fp16"}


@functools.cache
def available():
    """(True, what runs) when CuPy can compile and launch a kernel here, else (False, why and what to do)."""
    return _probe()


def _probe():
    if cp is None:
        return False, f"cupy is not installed ({_IMPORT_ERROR}): pip install gpubp[cuda13] (or gpubp[cuda12])"
    try:
        if not cp.cuda.is_available():
            return False, "no CUDA driver / no GPU (cupy.cuda.is_available() is False)"
    except Exception as exc:
        return False, f"CUDA could not be queried ({type(exc).__name__}: {exc}); check the NVIDIA driver"
    try:
        # is_available() does not prove that NVRTC, the CUDA headers and a launch work: try all three.
        probe = cp.RawKernel(r'extern "C" __global__ void gpubp_probe(float* x) { x[threadIdx.x] = threadIdx.x; }',
                             "gpubp_probe")
        x = cp.zeros(2, dtype=cp.float32)
        probe((1,), (2,), (x,))
        got = cp.asnumpy(x)
        device = cp.cuda.runtime.getDeviceProperties(cp.cuda.runtime.getDevice())["name"]
    except Exception as exc:
        return False, (f"a GPU is present but a one-line probe kernel failed to compile or launch "
                       f"({type(exc).__name__}: {exc}); check the driver and that NVRTC and the CUDA headers "
                       f"are installed: pip install gpubp[cuda13] (or gpubp[cuda12])")
    if not np.array_equal(got, [0.0, 1.0]):
        return False, f"the probe kernel ran but wrote {got.tolist()} instead of [0.0, 1.0]"
    name = device.decode() if isinstance(device, bytes) else str(device)
    return True, f"cupy {cp.__version__} on {name}"


# ---- kernels: one RawModule per (file, device), functions looked up once -----------------------------------
_modules = {}
_functions = {}
_sm_counts = {}


def _module(filename, device):
    """The RawModule of one kernels/*.cu file for a device id; compiled lazily by CuPy on first get_function."""
    key = (filename, device)
    if key not in _modules:
        source, options, names = cuda_sources.module_source(filename)
        _modules[key] = cp.RawModule(code=source, options=options, name_expressions=names)
    return _modules[key]


def _kernel(filename, name):
    device = cp.cuda.runtime.getDevice()
    key = (name, device)
    fn = _functions.get(key)
    if fn is None:
        fn = _functions[key] = _module(filename, device).get_function(name)
    return fn


def _sm_count():
    device = cp.cuda.runtime.getDevice()
    if device not in _sm_counts:
        _sm_counts[device] = cp.cuda.Device(device).attributes["MultiProcessorCount"]
    return _sm_counts[device]


# ---- launch shapes (plain integer math: tested without a GPU) ------------------------------------------------
def ceil_div(a, b):
    return -(-a // b)


def gemm_tile(M, N, sm_count):
    """The large 128x128 tile when its tiles alone fill every SM, else the 64x64 one (4x the blocks)."""
    bm, bn = cuda_sources.LARGE_TILE[:2]
    return cuda_sources.LARGE_TILE if ceil_div(M, bm) * ceil_div(N, bn) >= sm_count else cuda_sources.SMALL_TILE


def gemm_grid(tile, M, N, slices=1):
    return (ceil_div(M, tile[0]), ceil_div(N, tile[1]), slices)


def split_k(M, N, K, tile, sm_count):
    """(slices, rows per slice) of weight_grad's K = batch: enough slices for about two blocks per SM, each
    slice at least _MIN_SLICE_ROWS rows and a multiple of the tile's BK (so 16-byte loads stay aligned)."""
    tiles = ceil_div(M, tile[0]) * ceil_div(N, tile[1])
    slices = min(ceil_div(2 * sm_count, tiles), K // _MIN_SLICE_ROWS, _MAX_SLICES)
    if slices <= 1:
        return 1, K
    bk = tile[2]
    rows = ceil_div(ceil_div(K, slices), bk) * bk
    return ceil_div(K, rows), rows


def elementwise_grid(size, sm_count):
    """A grid-stride launch: enough blocks to fill the GPU, no more than the work needs."""
    return (max(1, min(ceil_div(size, _THREADS), 32 * sm_count)),)


def loss_blocks(N):
    """loss_grad_kernel's grid: a warp per row, 8 rows per block, at most _LOSS_MAX_BLOCKS blocks."""
    return min(ceil_div(N, _THREADS // 32), _LOSS_MAX_BLOCKS)


def gather_launch(n, F, itemsize, sm_count):
    """(group_log2, grid) of gather_rows_kernel: a group of 2^group_log2 threads per row, as many as the row
    has 16-byte vectors (up to the block), grid-stride over the n rows."""
    vectors = ceil_div(F, 16 // itemsize)
    group_log2 = min(max(vectors - 1, 0).bit_length(), int(math.log2(_THREADS)))
    rows_per_block = _THREADS >> group_log2
    return group_log2, (max(1, min(ceil_div(n, rows_per_block), 32 * sm_count)),)


def count_correct_grid(loss, N, C, sm_count):
    """count_correct_kernel's grid: bce grid-stride over the N·C elements; softmax_ce a warp per row."""
    if loss == losses.BCE:
        return elementwise_grid(N * C, sm_count)
    return (max(1, min(ceil_div(N, _THREADS // 32), 32 * sm_count)),)


def _i32(x):
    x = int(x)
    if not -2**31 <= x < 2**31:
        raise ValueError(f"a size of {x} does not fit the kernels' 32-bit int parameters")
    return np.int32(x)


class CaptureUnsafe(RuntimeError):
    """An op that cannot be part of a CUDA graph (a host transfer or a synchronisation) ran during capture."""


# ---- the backend -----------------------------------------------------------------------------------------------
class CupyBackend(Backend):
    name = "cupy"
    PRECISIONS = P.PRECISIONS   # fp32: the SIMT kernels; tf32, bf16, fp16: kernels/dense_tc.cu (tensor cores)
    real_gpu = True

    def __init__(self, deterministic=False):
        super().__init__(deterministic)
        if cp is None:
            raise RuntimeError(available()[1])
        self.use_graphs = os.environ.get("GPUBP_CUDA_GRAPHS", "1") != "0"
        self.graph_errors = {}   # step key -> why it could not be captured (it then runs eagerly)
        self._steps = {}         # step key -> ("warm", objects) | "eager" | (graph, its memory pool, objects)
        self._capture_stream = None
        self._capturing = False
        self._scratch = {}
        self._copy_stream = None   # streamed chunks (upload_chunk): their copies, beside the compute stream
        self._chunk_slots = {}     # slot -> _ChunkSlot

    # ---- helpers -------------------------------------------------------------------------------------------
    def _dtype_name(self, *arrays):
        """The common dtype ('float32' / 'float64') of `arrays` (the kernels' T); TypeError otherwise."""
        dtype = arrays[0].dtype
        for a in arrays:
            if a.dtype != dtype:
                raise TypeError(f"arrays: expected one dtype for all of an op's arrays, got {dtype} and {a.dtype}")
            if not a.flags.c_contiguous:
                raise ValueError(f"arrays: the kernels need C-contiguous arrays, got strides {a.strides}")
        if dtype.name not in cuda_sources.C_TYPES:
            raise TypeError(f"dtype: expected float32 or float64, got {dtype}")
        return dtype.name

    def _scratch_buffer(self, key, size, dtype):
        """A device buffer kept for the life of the backend (made on first use: later calls allocate nothing)."""
        key = (cp.cuda.runtime.getDevice(), key, size, np.dtype(dtype).name)
        buf = self._scratch.get(key)
        if buf is None:
            buf = self._scratch[key] = cp.empty(size, dtype=dtype)
        return buf

    def _count_read(self):
        """A device-to-host copy, which waits for the device (base.py's counters)."""
        self.counters["d2h"] += 1
        self.counters["sync"] += 1

    def _refuse_while_capturing(self, what):
        if self._capturing:
            raise CaptureUnsafe(f"{what} cannot be captured in a CUDA graph")

    # ---- arrays --------------------------------------------------------------------------------------------
    def empty(self, shape, dtype):
        return cp.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        return cp.zeros(shape, dtype=dtype)

    def is_device_array(self, x):
        return isinstance(x, cp.ndarray)

    def adopt(self, x, what="array"):
        if x is None or isinstance(x, (cp.ndarray, np.ndarray)):
            return x
        device = dlpack_device(x)
        if device is not None and device[0] in DLPACK_CUDA and device[1] != cp.cuda.runtime.getDevice():
            raise ValueError(f"{what}: on CUDA device {device[1]}, but this model's arrays are on device "
                             f"{cp.cuda.runtime.getDevice()}; move it there first (e.g. tensor.to('cuda:"
                             f"{cp.cuda.runtime.getDevice()}'))")
        if cuda_array_interface(x, what) is not None:
            return cp.asarray(x)              # a view of the same device memory (CuPy keeps x alive)
        if device is not None and device[0] in DLPACK_CUDA:
            return cp.from_dlpack(x)          # likewise, through DLPack
        return x

    def asarray(self, x, dtype):
        if isinstance(x, cp.ndarray) or hasattr(x, "__cuda_array_interface__"):
            return cp.ascontiguousarray(cp.asarray(x), dtype=dtype)   # no copy when it already fits
        self._refuse_while_capturing("a host-to-device copy")
        self.counters["h2d"] += 1
        return cp.asarray(np.ascontiguousarray(x, dtype=dtype))

    def copy_into(self, dst, src):
        if isinstance(src, cp.ndarray):
            cp.copyto(dst, src, casting="unsafe")
            return
        self._refuse_while_capturing("a host-to-device copy")
        self.counters["h2d"] += 1
        host = np.ascontiguousarray(np.broadcast_to(np.asarray(src).astype(dst.dtype, copy=False), dst.shape))
        dst.set(host)

    def to_numpy(self, x):
        self._refuse_while_capturing("a device-to-host copy")
        self._count_read()
        return cp.asnumpy(x)

    def view(self, flat, offset, shape):
        return flat[offset:offset + int(np.prod(shape))].reshape(shape)

    def all_finite(self, x):
        self._refuse_while_capturing("all_finite (a synchronising read)")
        self._count_read()
        return bool(cp.isfinite(x).all())

    def all_finite_many(self, arrays):
        self._refuse_while_capturing("all_finite_many (a synchronising read)")
        flags = cp.stack([cp.isfinite(a).all() for a in arrays])   # reduced on the device: one sync below
        self._count_read()
        return bool(flags.all())

    def one_hot(self, labels, classes, out):
        # labels (N,) integers, out (N, classes)
        if isinstance(labels, cp.ndarray):
            device_labels = cp.ascontiguousarray(labels, dtype=np.int64)   # no copy when it already is
        else:
            self._refuse_while_capturing("a host-to-device copy of labels")
            self.counters["h2d"] += 1
            device_labels = cp.asarray(np.ascontiguousarray(labels, dtype=np.int64))
        N = out.shape[0]
        if device_labels.shape != (N,) or out.shape != (N, classes):
            raise ValueError(f"one_hot: expected labels ({N},) and out ({N}, {classes}), "
                             f"got {device_labels.shape} and {out.shape}")
        dtype = self._dtype_name(out)
        _kernel("loss.cu", cuda_sources.kernel_name("one_hot_kernel", dtype))(
            elementwise_grid(out.size, _sm_count()), (_THREADS,),
            (device_labels, out, np.int64(N), _i32(classes)))

    def storage_dtype(self, precision):
        """float32 for fp32/tf32; bf16: uint16 (raw bits: CuPy has no bfloat16 dtype); fp16: float16 (CuPy's own
        type, the same bits). Each 16-bit format has its own dtype, so an op that takes no precision (loss_grad)
        knows which one its output holds; gpubp.precision.decode reads host copies of both."""
        if precision not in P.PRECISIONS:
            raise ValueError(f"precision: expected one of {list(P.PRECISIONS)}, got {precision!r}")
        return _NARROW_DTYPES.get(precision, np.dtype(np.float32))

    def synchronize(self):
        self.counters["sync"] += 1
        cp.cuda.Device().synchronize()

    def free_memory(self):
        # the driver's free memory plus what CuPy's pool holds unused (it hands that out first)
        return cp.cuda.runtime.memGetInfo()[0] + cp.get_default_memory_pool().free_bytes()

    # ---- the kernel set ------------------------------------------------------------------------------------
    def dense_forward(self, A_prev, W, b, act, alpha, Z, A, precision="fp32"):
        # A_prev (N, in), W (out, in), b (out,) or None, Z and A (N, out)
        if self._tensor_cores(precision):
            return self._dense_forward_tc(A_prev, W, b, act, alpha, Z, A, precision)
        N, n_in = A_prev.shape
        n_out = W.shape[0]
        dtype = self._dtype_name(A_prev, W, Z, A, *(() if b is None else (b,)))
        if N == 0 or n_out == 0:
            return
        tile = gemm_tile(N, n_out, _sm_count())
        _kernel("dense_forward.cu", cuda_sources.kernel_name("dense_forward_kernel", dtype, tile))(
            gemm_grid(tile, N, n_out), (_THREADS,),
            (A_prev, W, Z if b is None else b, Z, A, _i32(N), _i32(n_in), _i32(n_out), np.int32(b is not None),
             np.int32(act), np.float64(alpha)))

    def activation_mask(self, dA, Z, A, act, alpha, delta):
        # dA, Z, A, delta (N, out); delta may be dA
        dtype = self._dtype_name(dA, Z, A, delta)
        if delta.size == 0:
            return
        _kernel("dense_backward.cu", cuda_sources.kernel_name("activation_mask_kernel", dtype))(
            elementwise_grid(delta.size, _sm_count()), (_THREADS,),
            (dA, Z, A, delta, np.int64(delta.size), np.int32(act), np.float64(alpha)))

    @staticmethod
    def _empty_weight_grad(N, n_out, n_in, dW, db, accumulate):
        """True when weight_grad has no product to launch: no outputs or inputs (nothing to write), or no rows
        (an empty sum: dW and db set to 0, or left as they are when accumulating)."""
        if n_out == 0 or n_in == 0:
            return True
        if N == 0:
            if not accumulate:
                dW.fill(0)
                if db is not None:
                    db.fill(0)
            return True
        return False

    def weight_grad(self, delta, A_prev, dW, db, accumulate=False, precision="fp32"):
        # delta (N, out), A_prev (N, in), dW (out, in), db (out,) or None
        if self._tensor_cores(precision):
            return self._weight_grad_tc(delta, A_prev, dW, db, accumulate, precision)
        N, n_out = delta.shape
        n_in = A_prev.shape[1]
        dtype = self._dtype_name(delta, A_prev, dW, *(() if db is None else (db,)))
        if self._empty_weight_grad(N, n_out, n_in, dW, db, accumulate):
            return
        sm_count = _sm_count()
        tile = gemm_tile(n_out, n_in, sm_count)
        gemm = _kernel("dense_backward.cu", cuda_sources.kernel_name("weight_grad_kernel", dtype, tile))
        self._split_k_weight_grad(gemm, tile, (delta, A_prev), dW, db, accumulate, N, dtype)

    def _split_k_weight_grad(self, gemm, tile, operands, dW, db, accumulate, N, dtype):
        """weight_grad's launches, SIMT or tensor-core `gemm` alike (the same parameters after its two operands):
        one launch over the whole batch, or split K: slices write partial sums, a second launch adds them in
        slice order (no atomics)."""
        n_out, n_in = dW.shape
        sm_count = _sm_count()
        slices, rows = split_k(n_out, n_in, N, tile, sm_count)
        has_bias = np.int32(db is not None)
        if slices == 1:
            gemm(gemm_grid(tile, n_out, n_in), (_THREADS,),
                 (*operands, dW, dW if db is None else db, _i32(N), _i32(n_in), _i32(n_out), _i32(N),
                  has_bias, np.int32(accumulate)))
            return
        dW_parts = self._scratch_buffer("weight_grad dW parts", slices * dW.size, dtype)
        db_parts = self._scratch_buffer("weight_grad db parts", slices * n_out, dtype)
        gemm(gemm_grid(tile, n_out, n_in, slices), (_THREADS,),
             (*operands, dW_parts, db_parts, _i32(N), _i32(n_in), _i32(n_out), _i32(rows), has_bias,
              np.int32(0)))
        _kernel("dense_backward.cu", cuda_sources.kernel_name("weight_grad_reduce_kernel", dtype))(
            elementwise_grid(dW.size + n_out, sm_count), (_THREADS,),
            (dW_parts, db_parts, dW, dW if db is None else db, np.int32(slices), np.int64(dW.size),
             _i32(n_out), has_bias, np.int32(accumulate)))

    def input_grad(self, delta, W, dA_prev, precision="fp32"):
        # delta (N, out), W (out, in), dA_prev (N, in)
        if self._tensor_cores(precision):
            return self._input_grad_tc(delta, W, dA_prev, None, None, -1, 0.0, precision)
        self._input_grad(delta, W, dA_prev, None, None, -1, 0.0)

    def input_grad_masked(self, delta, W, Z_prev, A_prev, act, alpha, delta_prev, precision="fp32"):
        """δ_prev = (δ · W) ⊙ g'(Z_prev): input_grad and the previous layer's activation_mask in one launch
        (dA_prev is never stored). delta (N, out), W (out, in), Z_prev, A_prev, delta_prev (N, in);
        delta_prev may be the same array as Z_prev or A_prev. With a reduced precision A_prev and delta_prev
        are stored alike (float32, or both 16-bit), Z_prev is float32; the mask is applied in float32 to the
        GEMM's float32 result and δ_prev rounded once."""
        if self._tensor_cores(precision):
            return self._input_grad_tc(delta, W, delta_prev, Z_prev, A_prev, int(act), alpha, precision)
        self._input_grad(delta, W, delta_prev, Z_prev, A_prev, int(act), alpha)

    def _input_grad(self, delta, W, out, Z_prev, A_prev, mask_act, alpha):
        N, n_out = delta.shape
        n_in = W.shape[1]
        masked = mask_act >= 0
        dtype = self._dtype_name(delta, W, out, *((Z_prev, A_prev) if masked else ()))
        if N == 0 or n_in == 0:
            return
        if n_out == 0:  # an empty sum, then the mask of zero is zero
            out.fill(0)
            return
        tile = gemm_tile(N, n_in, _sm_count())
        _kernel("dense_backward.cu", cuda_sources.kernel_name("input_grad_kernel", dtype, tile))(
            gemm_grid(tile, N, n_in), (_THREADS,),
            (delta, W, out, Z_prev if masked else out, A_prev if masked else out, _i32(N), _i32(n_in),
             _i32(n_out), np.int32(mask_act), np.float64(alpha)))

    def loss_grad(self, loss, act, alpha, Z, y, A, delta, loss_out, scale=None):
        # Z, y, A, delta (N, out); loss_out (1,); scale None or a device float64 (1,) (the fp16 loss scale)
        N, C = Z.shape
        if y.shape != Z.shape:   # (N,) targets of a one-output model: a view, no copy
            y = y.reshape(Z.shape)
        stored = scale is not None or delta.dtype != Z.dtype
        dtype = self._dtype_name(Z, y, A, loss_out, *(() if stored else (delta,)))
        if stored:   # δ in its storage format (its dtype says which), and/or scaled: float32 models only
            fmt = self._format_of(delta, "delta")
            if dtype != "float32":
                raise TypeError(f"delta: a stored or scaled δ needs a float32 model, got {dtype}")
            if scale is not None:
                self._check_small_array("scale", scale, np.float64, (1,))
        if Z.size == 0:
            loss_out.fill(0)
            return
        loss_scale = {losses.MSE: 0.5 / N, losses.BCE: 1.0 / (N * C), losses.SOFTMAX_CE: 1.0 / N}[loss]
        blocks = loss_blocks(N)
        block_sums = self._scratch_buffer("loss block sums", _LOSS_MAX_BLOCKS, np.float64)
        head = (np.int32(loss), np.int32(act), np.float64(alpha), Z, y, A)
        if stored:
            _kernel("loss.cu", cuda_sources.format_kernel_name("loss_grad_stored_kernel", fmt))(
                (blocks,), (_THREADS,),
                (*head, self._bits(delta), block_sums, _i32(N), _i32(C), block_sums if scale is None else scale,
                 np.int32(scale is not None)))
        else:
            _kernel("loss.cu", cuda_sources.kernel_name("loss_grad_kernel", dtype))(
                (blocks,), (_THREADS,), (*head, delta, block_sums, _i32(N), _i32(C)))
        _kernel("loss.cu", cuda_sources.kernel_name("loss_reduce_kernel", dtype))(
            (1,), (_THREADS,), (block_sums, np.int32(blocks), np.float64(loss_scale), loss_out))

    # ---- tensor-core GEMMs (kernels/dense_tc.cu) -----------------------------------------------------------
    def _tensor_cores(self, precision):
        """True for tf32/bf16/fp16 (the tensor-core kernels), False for fp32 (the SIMT kernels)."""
        if precision == "fp32":
            return False
        if precision not in P.REDUCED:
            raise ValueError(f"precision: expected one of {list(P.PRECISIONS)}, got {precision!r}")
        return True

    @staticmethod
    def _format_of(x, name):
        """The storage format ('fp32', 'bf16', 'fp16') a stored array's dtype names; TypeError otherwise."""
        fmt = _FORMAT_OF_DTYPE.get(np.dtype(x.dtype))
        if fmt is None:
            raise TypeError(f"{name}: expected float32, uint16 (bf16 bits) or float16, got {x.dtype}")
        if not x.flags.c_contiguous:
            raise ValueError(f"{name}: the kernels need C-contiguous arrays, got strides {x.strides}")
        return fmt

    @staticmethod
    def _bits(x):
        """A 16-bit array as the kernels take it (unsigned short: a uint16 view, no copy); float32 as it is."""
        return x.view(np.uint16) if x.dtype.itemsize == 2 else x

    def _float32(self, name, x):
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            raise TypeError(f"{name}: expected a C-contiguous float32 array with a reduced precision, got "
                            f"{x.dtype}{'' if x.flags.c_contiguous else ' (not C-contiguous)'}")
        return x

    def round_to_storage(self, src, dst, precision):
        # src (P,) float32, dst (P,) storage_dtype(precision): one to_storage_kernel launch (RNE)
        self._float32("src", src)
        if precision not in _NARROW_DTYPES or self._format_of(dst, "dst") != precision or dst.shape != src.shape:
            raise TypeError(f"round_to_storage: expected dst of {src.shape} in precision {precision!r}'s 16-bit "
                            f"storage, got {dst.dtype} {dst.shape}")
        self._to_storage(src, self._bits(dst), precision)

    @staticmethod
    def _to_storage(src, bits, precision):
        """bits (uint16, src's size) = src (float32) rounded to precision's format: to_storage_kernel."""
        if src.size:
            _kernel("dense_tc.cu", cuda_sources.format_kernel_name("to_storage_kernel", precision))(
                elementwise_grid(src.size, _sm_count()), (_THREADS,),
                (src.reshape(-1), bits.reshape(-1), np.int64(src.size)))

    def _operand(self, x, precision, role):
        """A GEMM operand in precision's storage, as dense_tc.cu takes it: tf32 float32 as it is; bf16/fp16 bits
        as they are (a network's W: its round_to_storage copy), or a float32 array (W, X) converted into scratch
        (to_storage_kernel, RNE)."""
        fmt = self._format_of(x, role)
        if fmt == "fp32" and precision in _NARROW_DTYPES:
            out = self._scratch_buffer(("tc operand", role), x.size, np.uint16)
            self._to_storage(x, out, precision)
            return out
        if fmt == "fp32" or fmt == precision or (x.dtype == np.uint16 and precision == "fp16"):   # raw fp16 bits too
            return self._bits(x)
        raise TypeError(f"{role}: a {precision} GEMM takes float32 or {precision} storage "
                        f"({_NARROW_DTYPES.get(precision, 'float32')}), got {x.dtype}")

    def _output(self, x, precision, name):
        """(narrow, array) of an output the kernels write: narrow = 1 for precision's 16-bit storage, 0 for float32."""
        fmt = self._format_of(x, name)
        if fmt == "fp32":
            return 0, x
        if fmt == precision or (x.dtype == np.uint16 and precision == "fp16"):
            return 1, self._bits(x)
        raise TypeError(f"{name}: a {precision} op writes float32 or {precision} storage "
                        f"({_NARROW_DTYPES.get(precision, 'float32')}), got {x.dtype}")

    def _dense_forward_tc(self, A_prev, W, b, act, alpha, Z, A, precision):
        N, n_in = A_prev.shape
        n_out = W.shape[0]
        self._float32("Z", Z)
        if b is not None:
            self._float32("b", b)
        narrow, A_out = self._output(A, precision, "A")
        if N == 0 or n_out == 0:
            return
        a_op, w_op = self._operand(A_prev, precision, "A_prev"), self._operand(W, precision, "W")
        f32_any, narrow_any = self._placeholders(precision)
        _kernel("dense_tc.cu", cuda_sources.tc_kernel_name("dense_forward_tc_kernel", precision))(
            gemm_grid(_TC_TILE, N, n_out), (_THREADS,),
            (a_op, w_op, Z if b is None else b, Z, f32_any if narrow else A_out, A_out if narrow else narrow_any,
             np.int32(narrow),
             _i32(N), _i32(n_in), _i32(n_out), np.int32(b is not None), np.int32(act), np.float64(alpha)))

    def _input_grad_tc(self, delta, W, out, Z_prev, A_prev, mask_act, alpha, precision):
        N, n_out = delta.shape
        n_in = W.shape[1]
        narrow, out_arg = self._output(out, precision, "delta_prev")
        masked = mask_act >= 0
        if masked:
            self._float32("Z_prev", Z_prev)
            if (self._output(A_prev, precision, "A_prev")[0]) != narrow:
                raise TypeError(f"A_prev, delta_prev: expected one storage dtype, got {A_prev.dtype} and {out.dtype}")
        if N == 0 or n_in == 0:
            return
        if n_out == 0:   # an empty sum, then the mask of zero is zero
            out.fill(0)
            return
        d_op, w_op = self._operand(delta, precision, "delta"), self._operand(W, precision, "W")
        f32_any, narrow_any = self._placeholders(precision)
        a_arg = self._bits(A_prev) if masked else (narrow_any if narrow else f32_any)
        out32, out_narrow = (f32_any, out_arg) if narrow else (out_arg, narrow_any)
        a32, a_narrow = (f32_any, a_arg) if narrow else (a_arg, narrow_any)
        _kernel("dense_tc.cu", cuda_sources.tc_kernel_name("input_grad_tc_kernel", precision))(
            gemm_grid(_TC_TILE, N, n_in), (_THREADS,),
            (d_op, w_op, out32, out_narrow, Z_prev if masked else f32_any, a32, a_narrow, np.int32(narrow), _i32(N),
             _i32(n_in), _i32(n_out), np.int32(mask_act), np.float64(alpha)))

    def _placeholders(self, precision):
        """(float32, narrow) one-element arrays for the pointer parameters a kernel is told not to touch (the
        float32 or the 16-bit twin of an output): the 16-bit one is float32 for tf32, whose format is float32."""
        narrow = np.uint16 if precision in _NARROW_DTYPES else np.float32
        return self._scratch_buffer("placeholder", 1, np.float32), self._scratch_buffer("placeholder", 1, narrow)

    def _weight_grad_tc(self, delta, A_prev, dW, db, accumulate, precision):
        # NOTE: db is summed from the GEMM's δ tiles, i.e. of δ as the GEMM reads it: the stored δ whenever δ is
        # stored in the precision (as the network stores it). A float32 δ given to a bf16/fp16 weight_grad is
        # converted first, so its db would be Σ round_p(δ), not the reference's Σ δ.
        N, n_out = delta.shape
        n_in = A_prev.shape[1]
        self._float32("dW", dW)
        if db is not None:
            self._float32("db", db)
        self._format_of(delta, "delta"), self._format_of(A_prev, "A_prev")
        if self._empty_weight_grad(N, n_out, n_in, dW, db, accumulate):
            return
        operands = (self._operand(delta, precision, "delta"), self._operand(A_prev, precision, "A_prev"))
        gemm = _kernel("dense_tc.cu", cuda_sources.tc_kernel_name("weight_grad_tc_kernel", precision))
        self._split_k_weight_grad(gemm, _TC_TILE, operands, dW, db, accumulate, N, "float32")

    # ---- the fully fused MLP (kernels/fused_mlp.cu; gpubp/fused.py) ----------------------------------------------
    # One launch of fused_mlp_forward_kernel (grid ceil(N / 128), 256 threads) runs every layer; in training it
    # writes the hidden A, the prediction, each row's loss and δ_L, then fused_mlp_backward_kernel writes every
    # hidden δ, and the per-layer tensor-core weight_grad makes dW and db from them. The 16-bit weights and the
    # gathered biases are refreshed from the model's float32 views at every call (the optimizer moved them):
    # L + 1 small launches of fused_mlp_round_kernel and device-to-device bias copies, all capturable. Hidden layers
    # narrower than the kernel's H are zero-padded on the way (gpubp/fused.py padded_shapes), and their weight
    # gradients taken from the padded blocks (_padded_weight_grad).
    FUSED = True

    def fused_forward(self, X, Ws, bs, act_ids, alphas, precision, out, hidden=None, loss=None, Y=None,
                      delta_out=None, loss_out=None, scale=None):
        self._fused_forward(self._fused_pack(Ws, bs, alphas, precision), X, Ws, bs, act_ids, alphas, precision, out,
                            hidden, loss, Y, delta_out, loss_out, scale)

    def fused_backward(self, delta_out, Ws, act_ids, alphas, precision, hidden, deltas):
        weights = self._fused_pack(Ws, [None] * len(Ws), alphas, precision)[0]
        self._fused_backward(weights, delta_out, Ws, act_ids, alphas, precision, hidden, deltas)

    def fused_train(self, X, Y, loss, Ws, bs, act_ids, alphas, precision, out, hidden, deltas, delta_out, loss_out,
                    dWs, dbs, scale=None):
        packed = self._fused_pack(Ws, bs, alphas, precision)   # once for both kernels
        self._fused_forward(packed, X, Ws, bs, act_ids, alphas, precision, out, hidden, loss, Y, delta_out,
                            loss_out, scale)
        self._fused_backward(packed[0], delta_out, Ws, act_ids, alphas, precision, hidden, deltas)
        self._fused_weight_grads(X, hidden, deltas, delta_out, dWs, dbs, precision)

    def _fused_pack(self, Ws, bs, alphas, precision):
        """(weights, biases, alphas) as the fused kernels take them: every W rounded to P (RNE) into its zero-padded
        place of one 16-bit buffer W_0 … W_L (fused.padded_shapes; one launch a layer, which writes the padding's
        zeros too: the flat parameter buffer interleaves W and b; each padded W's size is a multiple of H, a
        multiple of 16, so every layer starts 16-byte aligned), the biases present copied back to back into one
        float32 buffer, zeros past a hidden layer's width, the alphas a float32 device array made once per set of
        values."""
        if precision not in fused.FUSED_PRECISIONS:
            raise ValueError(f"precision: the fused MLP takes {list(fused.FUSED_PRECISIONS)}, got {precision!r}")
        for l, W in enumerate(Ws):
            self._float32(f"Ws[{l}]", W)
        shapes = fused.padded_shapes([W.shape for W in Ws])
        weights = self._scratch_buffer(("fused weights", precision), sum(r * c for r, c in shapes), np.uint16)
        round_kernel = _kernel("fused_mlp.cu", cuda_sources.tc_kernel_name("fused_mlp_round_kernel", precision))
        offset = 0
        for W, (rows, cols) in zip(Ws, shapes):
            round_kernel(elementwise_grid(rows * cols, _sm_count()), (_THREADS,),
                         (W.reshape(-1), _i32(W.shape[0]), _i32(W.shape[1]), weights[offset:offset + rows * cols],
                          _i32(rows), _i32(cols)))
            offset += rows * cols
        present = [(b, rows) for b, (rows, _) in zip(bs, shapes) if b is not None]
        biases = self._scratch_buffer("fused biases", max(1, sum(rows for _, rows in present)), np.float32)
        offset = 0
        for b, rows in present:
            cp.copyto(biases[offset:offset + b.size], b)
            if rows > b.size:   # a padded hidden layer: its padded units' Z is 0
                cp.copyto(biases[offset + b.size:offset + rows], 0.0)
            offset += rows
        key = ("fused alphas",) + tuple(float(a) for a in alphas)
        if key not in self._scratch:   # made on the first (eager) call, before a step is captured
            self._refuse_while_capturing("the fused MLP's alphas (a host-to-device copy)")
            self._scratch[key] = cp.asarray(np.array(alphas, np.float32))
        return weights, biases, self._scratch[key]

    def _fused_forward(self, packed, X, Ws, bs, act_ids, alphas, precision, out, hidden, loss, Y, delta_out,
                       loss_out, scale):
        weights, biases, alpha_array = packed
        N, in_width = X.shape
        H, out_width = self._fused_width(Ws), Ws[-1].shape[0]
        self._float32("out", out)
        training = loss is not None
        f32_any, narrow_any = self._placeholders(precision)
        x_float = int(X.dtype == np.float32)
        x16 = narrow_any if x_float else self._operand(X, precision, "X")
        if not X.flags.c_contiguous:
            raise ValueError(f"X: the kernels need C-contiguous arrays, got strides {X.strides}")
        if training:
            self._float32("Y", Y)
            if hidden.shape != (len(Ws) - 1, N, H):
                raise ValueError(f"hidden: expected shape {(len(Ws) - 1, N, H)}, got {hidden.shape}")
            narrow_hidden = self._output(hidden, precision, "hidden")[1]
            delta_bits = self._output(delta_out, precision, "delta_out")[1]
            row_loss = self._scratch_buffer("fused row loss", max(1, N), np.float64)
            scale_arg = scale if scale is not None else self._fused_one()
        else:
            narrow_hidden = delta_bits = narrow_any          # pointers the kernel does not touch in inference
            row_loss = scale_arg = self._fused_one()
        if N == 0:
            return
        name = cuda_sources.fused_kernel_name("fused_mlp_forward_kernel", precision, H)
        _kernel("fused_mlp.cu", name)(
            (ceil_div(N, fused.ROWS_PER_BLOCK),), (_THREADS,),
            (x16, _i32(in_width), _i32(in_width), weights, biases, alpha_array,
             fused.pack_activations(act_ids), fused.pack_bias_mask(bs), _i32(len(Ws)), _i32(out_width), _i32(N),
             np.int32(training), out, narrow_hidden, np.int32(loss if training else -1),
             Y if training else f32_any, delta_bits, row_loss, scale_arg, X if x_float else f32_any,
             np.int32(x_float)))
        if training:   # L: the rows' shares added in a fixed order (loss.cu's reduction: one block)
            _kernel("loss.cu", cuda_sources.kernel_name("loss_reduce_kernel", self._dtype_name(loss_out)))(
                (1,), (_THREADS,), (row_loss, _i32(N), np.float64(1.0), loss_out))

    def _fused_backward(self, weights, delta_out, Ws, act_ids, alphas, precision, hidden, deltas):
        N, out_width = delta_out.shape
        in_width = Ws[0].shape[1]
        if deltas.shape != hidden.shape:
            raise ValueError(f"deltas: expected hidden's shape {hidden.shape}, got {deltas.shape}")
        delta_bits = self._output(delta_out, precision, "delta_out")[1]
        hidden_bits = self._output(hidden, precision, "hidden")[1]
        deltas_bits = self._output(deltas, precision, "deltas")[1]
        alpha_array = self._fused_pack_alphas(alphas)
        if N == 0:
            return
        name = cuda_sources.fused_kernel_name("fused_mlp_backward_kernel", precision, self._fused_width(Ws))
        _kernel("fused_mlp.cu", name)(
            (ceil_div(N, fused.ROWS_PER_BLOCK),), (_THREADS,),
            (delta_bits, _i32(out_width), weights, _i32(in_width), alpha_array, fused.pack_activations(act_ids),
             _i32(len(Ws)), _i32(N), hidden_bits, deltas_bits))

    @staticmethod
    def _fused_width(Ws):
        """The kernels' H for layers Ws: the instance the hidden layers are padded to."""
        return fused.kernel_width(W.shape[0] for W in Ws[:-1])

    def _padded_weight_grad(self, delta, A_prev, dW, db, precision):
        # weight_grad takes contiguous operands (no leading dimension), so with padding the whole padded product
        # goes to scratch and its real block to dW, db: dW[i, j] = Σₙ δ[n, i] A[n, j] reads only real columns,
        # whatever the padding holds. NOTE: this reads the stored A and δ once, as without padding; a compact
        # copy of their real columns first would read them twice and write them once more. The padded product's
        # extra FLOP are tensor-core FLOP of a memory-bound GEMM. Scratch and copies: capturable, no allocation
        # after the first call.
        n_out, n_in = dW.shape
        if delta.shape[1] == n_out and A_prev.shape[1] == n_in:
            return self.weight_grad(delta, A_prev, dW, db, precision=precision)
        rows, cols = delta.shape[1], A_prev.shape[1]
        padded_dW = self._scratch_buffer("fused padded dW", rows * cols, np.float32).reshape(rows, cols)
        padded_db = None if db is None else self._scratch_buffer("fused padded db", rows, np.float32)
        self.weight_grad(delta, A_prev, padded_dW, padded_db, precision=precision)
        cp.copyto(dW, padded_dW[:n_out, :n_in])
        if db is not None:
            cp.copyto(db, padded_db[:n_out])

    def _fused_pack_alphas(self, alphas):
        return self._scratch[("fused alphas",) + tuple(float(a) for a in alphas)]

    def _fused_one(self):
        """A device float64 [1.0]: the loss scale of a model without a scaler (and a pointer nobody reads)."""
        key = "fused one"
        if key not in self._scratch:
            self._refuse_while_capturing("the fused MLP's unit scale (a host-to-device copy)")
            self._scratch[key] = cp.full((1,), 1.0, dtype=np.float64)
        return self._scratch[key]

    # ---- the fp16 loss scaler (gpubp/loss_scale.py; kernels/loss_scale.cu) ----------------------------------
    def unscale_gradients(self, loss_out, grads, scaler, guard):
        # loss_out (1,), grads (P,) float32; scaler (loss_scale.SIZE,) and guard (G.SIZE,) float64
        self._dtype_name(loss_out, grads)
        self._float32("grads", grads)
        self._check_small_array("scaler", scaler, np.float64, (LS.SIZE,))
        self._check_small_array("guard", guard, np.float64, (G.SIZE,))
        bad_index = self._bad_index()
        _kernel("loss_scale.cu", "unscale_scan_kernel")(
            elementwise_grid(grads.size, _sm_count()), (_THREADS,),
            (loss_out, grads, np.int64(grads.size), scaler, guard, bad_index))
        _kernel("loss_scale.cu", "unscale_finish_kernel")((1,), (1,), (loss_out, bad_index, guard))

    def update_scale(self, scaler, guard):
        self._check_small_array("scaler", scaler, np.float64, (LS.SIZE,))
        self._check_small_array("guard", guard, np.float64, (G.SIZE,))
        _kernel("loss_scale.cu", "update_scale_kernel")((1,), (1,), (scaler, guard))

    # ---- guarded updates (gpubp/guard.py; kernels/optim.cu has the three launches and why) -------------------
    def sgd_update(self, params, grads, momentum_buf, step, hyper, guard):
        # params, grads, momentum_buf (P,) flat; step (1,) int64; hyper (5,) float64; guard (G.SIZE,) float64
        self._check_small_array("step", step, np.int64, (1,))
        self._check_small_array("hyper", hyper, np.float64, (len(self.SGD_HYPER),))
        self._check_small_array("guard", guard, np.float64, (G.SIZE,))
        if momentum_buf is None:   # μ is in device memory: the kernel cannot be told to leave b alone
            raise ValueError("momentum_buf: expected the momentum buffer (P,), got None")
        self._guarded_update("sgd_update_kernel", params, (grads, momentum_buf), 3, step, hyper, guard)

    def adam_update(self, params, grads, m, v, step, hyper, guard):
        # params, grads, m, v (P,) flat; step (1,) int64; hyper (5,) float64; guard (G.SIZE,) float64
        self._check_small_array("step", step, np.int64, (1,))
        self._check_small_array("hyper", hyper, np.float64, (len(self.ADAM_HYPER),))
        self._check_small_array("guard", guard, np.float64, (G.SIZE,))
        self._guarded_update("adam_update_kernel", params, (grads, m, v), 4, step, hyper, guard)

    def _guarded_update(self, kernel, params, others, slots, step, hyper, guard):
        """CHECK, APPLY, finish (kernels/optim.cu): `slots` = the bad_index slots the kernel may flag (the
        gradient, θ and the state buffers it writes)."""
        dtype = self._dtype_name(params, *others)
        if any(b.shape != params.shape for b in others):
            raise ValueError(f"{kernel}: expected every buffer of shape {params.shape}, got "
                             f"{[b.shape for b in others]}")
        bad_index = self._bad_index()
        update = _kernel("optim.cu", cuda_sources.kernel_name(kernel, dtype))
        grid = elementwise_grid(params.size, _sm_count())
        for phase in (_UPDATE_CHECK, _UPDATE_APPLY):
            update(grid, (_THREADS,),
                   (np.int32(phase), params, *others, step, hyper, guard, bad_index, np.int64(params.size)))
        _kernel("optim.cu", "update_finish_kernel")((1,), (1,), (bad_index, np.int32(slots), step, guard))

    # ---- the training loop's device-side ops (kernels/loop.cu) ------------------------------------------------
    def gather_rows(self, src, order, cursor, out):
        # src (M, F), order (>= M,) int64, cursor (1,) int64, out (n, F)
        dtype = self._dtype_name(src, out)
        self._check_small_array("order", order, np.int64)
        self._check_small_array("cursor", cursor, np.int64, (1,))
        if src.ndim != 2 or out.ndim != 2 or src.shape[1] != out.shape[1] or order.ndim != 1 \
                or order.shape[0] < src.shape[0]:
            raise ValueError(f"gather_rows: expected src (M, F), order (M,) and out (n, F), got {src.shape}, "
                             f"{order.shape} and {out.shape}")
        n, F = out.shape
        if n == 0 or F == 0:
            return
        group_log2, grid = gather_launch(n, F, src.itemsize, _sm_count())
        _kernel("loop.cu", cuda_sources.kernel_name("gather_rows_kernel", dtype))(
            grid, (_THREADS,),
            (src, order, cursor, out, np.int64(src.shape[0]), _i32(n), np.int64(F), np.int32(group_log2)))

    def advance_cursor(self, cursor, n):
        self._check_small_array("cursor", cursor, np.int64, (1,))
        _kernel("loop.cu", "advance_cursor_kernel")((1,), (1,), (cursor, np.int64(n)))

    def guard_loss(self, loss_out, guard):
        # loss_out (1,) model dtype; guard (G.SIZE,) float64
        dtype = self._dtype_name(loss_out)
        self._check_small_array("guard", guard, np.float64, (G.SIZE,))
        _kernel("loop.cu", cuda_sources.kernel_name("guard_loss_kernel", dtype))((1,), (1,), (loss_out, guard))

    def record_step(self, loss, loss_out, A, Y, guard):
        # loss_out (1,), A and Y (N, C) (Y may be (N,) for one output); guard (G.SIZE,) float64
        if Y.shape != A.shape and Y.size == A.size:
            Y = Y.reshape(A.shape)   # a view, no copy
        dtype = self._dtype_name(loss_out, A, Y)
        self._check_small_array("guard", guard, np.float64, (G.SIZE,))
        N, C = A.shape
        count = self._correct_count()
        compared = {losses.BCE: N * C, losses.SOFTMAX_CE: N}.get(loss, 0)
        if compared:
            _kernel("loop.cu", cuda_sources.kernel_name("count_correct_kernel", dtype))(
                count_correct_grid(loss, N, C, _sm_count()), (_THREADS,),
                (np.int32(loss), A, Y, _i32(N), _i32(C), guard, count))
        _kernel("loop.cu", cuda_sources.kernel_name("record_step_kernel", dtype))(
            (1,), (1,), (loss_out, count, _i32(N), np.int64(compared), guard))

    def _bad_index(self):
        """The check passes' int64 scratch (kernels/guard.cuh): the smallest bad index per buffer, GUARD_NO_INDEX
        between ops (each op's one-thread finish kernel resets what its check pass set)."""
        key = (cp.cuda.runtime.getDevice(), "bad index")
        if key not in self._scratch:
            self._scratch[key] = cp.full((_BAD_INDEX_SLOTS,), _NO_INDEX, dtype=np.int64)
        return self._scratch[key]

    def _correct_count(self):
        """record_step's int64 scratch: the step's correct predictions, 0 between ops."""
        key = (cp.cuda.runtime.getDevice(), "correct count")
        if key not in self._scratch:
            self._scratch[key] = cp.zeros((1,), dtype=np.int64)
        return self._scratch[key]

    @staticmethod
    def _check_small_array(name, x, dtype, shape=None):
        """One of the loop's small device arrays (step, cursor, order, hyper, guard): the kernels trust its dtype,
        shape and layout, so they are checked here."""
        if not (isinstance(x, cp.ndarray) and x.dtype == dtype and (shape is None or x.shape == shape)
                and x.ndim == 1 and x.flags.c_contiguous):
            raise TypeError(f"{name}: expected a C-contiguous 1-d device {np.dtype(dtype).name} array"
                            f"{'' if shape is None else f' of shape {shape}'}, got {type(x).__name__} "
                            f"{getattr(x, 'dtype', '')} {getattr(x, 'shape', '')}")

    # ---- streamed chunks: pinned host buffers, a copy stream, events (base.py's upload_chunk) ----------------
    def upload_chunk(self, slot, copies):
        """The host gathers the chunk into the slot's pinned buffers and copies them on the copy stream, so the
        copy overlaps the steps on the other slot's chunk. Ordering, by events (no host wait on the compute
        stream):
          - the host writes a pinned buffer only once its previous copy is done (the one wait: one per chunk,
            counted as a sync; that copy was queued a whole chunk of steps ago, so it is long done);
          - the copy stream waits for the event release_chunk(slot) recorded on the compute stream after the
            last step that read the slot's device buffers (never released: everything launched so far);
          - the compute stream waits for the copy's event before anything launched after this call."""
        self._refuse_while_capturing("a host-to-device copy")
        if self._copy_stream is None:
            self._copy_stream = cp.cuda.Stream(non_blocking=True)
        copy_stream, compute = self._copy_stream, cp.cuda.get_current_stream()
        state = self._chunk_slots.setdefault(slot, _ChunkSlot())
        if state.copied is not None:
            state.copied.synchronize()
            self.counters["sync"] += 1
        if state.copied is not None and state.released is None:
            state.released = compute.record()
        if state.released is not None:
            copy_stream.wait_event(state.released)
        for i, (dst, src, rows) in enumerate(copies):
            m = dst.shape[0] if rows is None else len(rows)
            pinned = self._pinned(slot, i, dst.shape, dst.dtype)[:m]
            _host_gather(pinned, src, rows)
            _copy_async(dst[:m], pinned, copy_stream)
            self.counters["h2d"] += 1
        state.copied, state.released = copy_stream.record(), None
        compute.wait_event(state.copied)

    def release_chunk(self, slot):
        state = self._chunk_slots.get(slot)
        if state is not None:
            state.released = cp.cuda.get_current_stream().record()

    def _pinned(self, slot, i, shape, dtype):
        """A page-locked host array of `shape` for copy i of `slot` (an asynchronous copy needs one). Kept for the
        next fit on data of the same shape (a chunk's size: together about the device memory the chunks take),
        replaced, and so freed, when another shape comes."""
        key = ("pinned", slot, i)
        buf = self._scratch.get(key)
        if buf is None or buf.shape != tuple(shape) or buf.dtype != np.dtype(dtype):
            self._scratch.pop(key, None)
            memory = cp.cuda.alloc_pinned_memory(max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize))
            buf = self._scratch[key] = np.ndarray(shape, dtype=dtype, buffer=memory)   # as cupyx.empty_pinned
        return buf

    # ---- whole-step CUDA graphs ----------------------------------------------------------------------------
    def run_step(self, key, fn):
        """First call with a key: run fn eagerly (compiles kernels, makes scratch). Second: capture fn as a
        CUDA graph and launch it. Later: launch the graph. key None always runs eagerly (base.py).
        A graph replays fn's launches with the arguments of the capture: the key must cover every host scalar
        fn passes (learning rate, ...). The buffers are guarded here: the graph keeps the objects fn's closure
        holds (a workspace, the arrays, `self` of a bound method) alive, and a call whose closure holds other
        objects under the same key (a rebuilt workspace, another model of the same shapes) starts over: it
        runs eagerly, as a first call (its first-call work, such as the fused path's alphas upload, cannot be
        captured), and the next call with those objects is captured; a stale graph is never replayed.
        Anything that cannot be captured (a host copy, a synchronisation, a CUDA error) makes that key run
        eagerly from then on; graph_errors[key] says why."""
        state = self._steps.get(key)
        if key is None or not self.use_graphs or self._capturing or state == "eager":
            fn()
            return
        captured = _closure_objects(fn)
        if state is None or not _same_objects(state[-1], captured):
            self._steps.pop(key, None)   # a stale graph goes now, its memory with it
            fn()
            self._steps[key] = ("warm", captured)
            return
        if state[0] == "warm":
            state = self._capture(key, fn, captured)
            if state == "eager":
                fn()   # nothing of a failed capture ran: run the step for real
                return
        graph = state[0]
        graph.launch(stream=cp.cuda.get_current_stream())

    def _capture(self, key, fn, captured):
        if self._capture_stream is None:
            self._capture_stream = cp.cuda.Stream(non_blocking=True)
        stream = self._capture_stream
        self._steps.pop(key, None)   # a stale graph goes now, its memory with it
        # A private pool: memory fn allocates during capture belongs to the graph alone, never reused by
        # arrays made later (a replay writes to the addresses of the capture).
        pool = cp.cuda.MemoryPool()
        self._capturing = True
        try:
            with cp.cuda.using_allocator(pool.malloc), stream:
                stream.begin_capture()
                try:
                    fn()
                finally:
                    graph = stream.end_capture()
        except Exception as exc:
            self.graph_errors[key] = f"{type(exc).__name__}: {exc}"
            self._steps[key] = "eager"
            return "eager"
        finally:
            self._capturing = False
        self._steps[key] = (graph, pool, captured)
        return self._steps[key]


class _ChunkSlot:
    """upload_chunk's events for one slot: `copied` (recorded on the copy stream after its last copy) and
    `released` (recorded on the compute stream by release_chunk; None until then)."""
    copied = None
    released = None


def _host_gather(out, src, rows):
    """out[...] = src[rows] (rows None: src), on the host, into a pinned buffer of upload_chunk."""
    if rows is None:
        np.copyto(out, src, casting="unsafe")
    else:
        np.take(src, rows, axis=0, out=out)


def _copy_async(dst, host, stream):
    """dst[...] = host, a pinned numpy array, queued on `stream` (the host does not wait)."""
    dst.set(host, stream=stream)


_VALUE_TYPES = (int, float, bool, str, bytes, type(None))


def _closure_objects(fn):
    """What a step closure reads its buffers through: the objects its closure cells hold, and `self` of a
    bound method."""
    objects = [getattr(fn, "__self__", None)]
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            objects.append(cell.cell_contents)
        except ValueError:   # an empty cell
            objects.append(None)
    return tuple(objects)


def _same_objects(old, new):
    """The same objects, one by one (plain values, which Python may rebuild each call, by value)."""
    return len(old) == len(new) and all(
        a is b or (type(a) is type(b) and isinstance(a, _VALUE_TYPES) and a == b) for a, b in zip(old, new))
