"""The CUDA sources of the cupy backend as NVRTC compiles them: one place that says, per kernels/*.cu file,
the final source string, the options and the name expressions (the template instances to build).

The runtime (cupy_backend.py) hands exactly `module_source(filename)` to cupy.RawModule, and the CI test
(tests/test_kernels_compile.py) hands the same to NVRTC with `runtime_nvrtc_options(arch)`, so CI compiles
what a GPU machine will compile. Needs no GPU and no CuPy: plain text work.

`#include "x.cuh"` lines are replaced by the header's text (recursively, each header once), because CuPy's
kernel cache keys on the source string and options, not on headers found through -I: an edited header
must change the source string.
"""
import pathlib
import re
from importlib import resources

KERNEL_FILES = ("dense_forward.cu", "dense_backward.cu", "loss.cu", "optim.cu", "loop.cu", "gemm_tc.cu",
                "dense_tc.cu", "loss_scale.cu", "fused_mlp.cu")

# Our options. CuPy 14 adds '-ftz=true' itself (flush float32 denormals; tests allow for it), plus an arch
# option and '--device-as-default-execution-space': see runtime_nvrtc_options.
OPTIONS = ("-std=c++17",)

# GEMM block tiles (BM, BN, BK, TM, TN): 256 threads each. LARGE_TILE (8x8 accumulators per thread) for
# problems that fill the GPU with 128x128 tiles; SMALL_TILE (4x4 per thread) gives 4x the blocks otherwise.
LARGE_TILE = (128, 128, 8, 8, 8)
SMALL_TILE = (64, 64, 8, 4, 4)
GEMM_TILES = (LARGE_TILE, SMALL_TILE)

C_TYPES = {"float32": "float", "float64": "double"}

_GEMM_KERNELS = {"dense_forward.cu": ("dense_forward_kernel",),
                 "dense_backward.cu": ("input_grad_kernel", "weight_grad_kernel")}
_PLAIN_KERNELS = {"dense_forward.cu": (),
                  "dense_backward.cu": ("activation_mask_kernel", "weight_grad_reduce_kernel"),
                  "loss.cu": ("loss_grad_kernel", "loss_reduce_kernel", "one_hot_kernel"),
                  "optim.cu": ("sgd_update_kernel", "adam_update_kernel"),
                  "loop.cu": ("gather_rows_kernel", "guard_loss_kernel", "count_correct_kernel", "record_step_kernel")}
_UNTEMPLATED_KERNELS = {"optim.cu": ("update_finish_kernel",), "loop.cu": ("advance_cursor_kernel",),
                        "loss_scale.cu": ("unscale_scan_kernel", "unscale_finish_kernel", "update_scale_kernel")}
# Tensor-core kernels (gemm_tc.cuh): templated on the operand precision's tag type, not on float/double,
# and (the GEMMs) on the operand layouts (A_KCONTIG, B_KCONTIG) of the three products of a dense layer.
TC_PRECISIONS = {"bf16": "TcBf16", "fp16": "TcFp16", "tf32": "TcTf32"}
TC_LAYOUTS = {"forward": (True, True), "input_grad": (True, False), "weight_grad": (False, False)}
_TC_KERNELS = {"gemm_tc.cu": ("gemm_tc_kernel",)}
# Storage formats (kernels/storage.cuh) of stored arrays: hidden A and δ of a precision; float32 otherwise.
STORE_FORMATS = {"fp32": "StoreF32", "tf32": "StoreF32", "bf16": "StoreBf16", "fp16": "StoreFp16"}
NARROW_FORMATS = ("bf16", "fp16")   # the precisions whose stored arrays are 16-bit
# The dense-layer tensor-core kernels (dense_tc.cu): each GEMM once per precision (the output format of forward
# and input_grad is a runtime flag).
_TC_DENSE_KERNELS = ("dense_forward_tc_kernel", "input_grad_tc_kernel", "weight_grad_tc_kernel")
# Kernels templated on a storage format alone: (kernel, formats)
_FORMAT_KERNELS = {"dense_tc.cu": (("to_storage_kernel", NARROW_FORMATS),),
                   "loss.cu": (("loss_grad_stored_kernel", ("tf32", "bf16", "fp16")),)}
# The fully fused MLP (issue 13): 16-bit precisions only, one instance per kernel width H (gpubp/fused.py's
# FUSED_WIDTHS; narrower hidden layers run zero-padded on the next one).
FUSED_PRECISIONS = ("bf16", "fp16")
FUSED_WIDTHS = (16, 32, 48, 64, 128)
_FUSED_KERNELS = {"fused_mlp.cu": ("fused_mlp_forward_kernel", "fused_mlp_backward_kernel")}
_FUSED_PLAIN_KERNELS = {"fused_mlp.cu": ("fused_mlp_round_kernel",)}   # one instance per precision

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.MULTILINE)


def kernel_name(kernel, dtype=None, tile=None):
    """The name expression of one instance, e.g. 'dense_forward_kernel<float, 128, 128, 8, 8, 8>'.
    dtype: 'float32' / 'float64' (None for an untemplated kernel); tile: a GEMM tile tuple or None."""
    if dtype is None:
        return kernel
    args = [C_TYPES[str(dtype)]] + [str(x) for x in (tile or ())]
    return f"{kernel}<{', '.join(args)}>"


def name_expressions(filename):
    """Every instance the runtime may ask of `filename`: each kernel for float and double, each GEMM for each
    tile."""
    names = []
    for dtype in C_TYPES:
        names += [kernel_name(k, dtype, tile) for k in _GEMM_KERNELS.get(filename, ()) for tile in GEMM_TILES]
        names += [kernel_name(k, dtype) for k in _PLAIN_KERNELS.get(filename, ())]
    names += list(_UNTEMPLATED_KERNELS.get(filename, ()))
    names += [tc_kernel_name(k, p, layout) for k in _TC_KERNELS.get(filename, ()) for p in TC_PRECISIONS
              for layout in TC_LAYOUTS]
    if filename == "dense_tc.cu":
        names += [tc_kernel_name(k, p) for k in _TC_DENSE_KERNELS for p in TC_PRECISIONS]
    names += [format_kernel_name(k, p) for k, formats in _FORMAT_KERNELS.get(filename, ()) for p in formats]
    names += [fused_kernel_name(k, p, width) for k in _FUSED_KERNELS.get(filename, ()) for p in FUSED_PRECISIONS
              for width in FUSED_WIDTHS]
    names += [tc_kernel_name(k, p) for k in _FUSED_PLAIN_KERNELS.get(filename, ()) for p in FUSED_PRECISIONS]
    return names


def format_kernel_name(kernel, precision):
    """'to_storage_kernel<StoreBf16>': a kernel templated on the storage format of `precision`."""
    return f"{kernel}<{STORE_FORMATS[precision]}>"


def fused_kernel_name(kernel, precision, width):
    """The name expression of a fused-MLP kernel, e.g. 'fused_mlp_forward_kernel<TcBf16, 64>'."""
    return f"{kernel}<{TC_PRECISIONS[precision]}, {int(width)}>"


def tc_kernel_name(kernel, precision, layout=None):
    """The name expression of a tensor-core kernel for a precision name and (GEMMs) a TC_LAYOUTS name, e.g.
    'gemm_tc_kernel<TcBf16, true, false>' for ('bf16', 'input_grad'); 'tc_mma_probe_kernel<TcBf16>'."""
    args = [TC_PRECISIONS[precision]] + [str(x).lower() for x in TC_LAYOUTS[layout]] if layout else \
        [TC_PRECISIONS[precision]]
    return f"{kernel}<{', '.join(args)}>"


def kernels_dir():
    """Where the kernels/*.cu sources are: the checkout's kernels/ folder beside the gpubp package (a plain
    checkout run with PYTHONPATH, as on the GPU machine, or an editable install), else the package data
    gpubp.kernels of an installed wheel. NOTE: the checkout is looked at first because `gpubp.kernels`
    exists only once installed, and an editable install of another checkout would map it to that one's."""
    checkout = pathlib.Path(__file__).resolve().parents[2] / "kernels"
    if all((checkout / name).is_file() for name in KERNEL_FILES):
        return checkout
    return resources.files("gpubp.kernels")


def read_kernel_file(name):
    """The text of one file of kernels/ (a .cu or .cuh), as it is on disk."""
    return kernels_dir().joinpath(name).read_text(encoding="utf-8")



def inline_includes(text, seen=None):
    """`text` with each `#include "x"` replaced by x's text from gpubp.kernels (each header pasted once)."""
    seen = set() if seen is None else seen

    def paste(match):
        header = match.group(1)
        if header in seen:
            return f"// {header}: already pasted above"
        seen.add(header)
        return f"// ---- {header} (pasted by gpubp) ----\n" + inline_includes(read_kernel_file(header), seen)

    return _INCLUDE.sub(paste, text)


def module_source(filename):
    """(source, options, name_expressions) of one kernels/*.cu file, as cupy.RawModule is given them."""
    if filename not in KERNEL_FILES:
        raise ValueError(f"filename: expected one of {KERNEL_FILES}, got {filename!r}")
    return inline_includes(read_kernel_file(filename)), OPTIONS, name_expressions(filename)


def runtime_nvrtc_options(arch):
    """The full NVRTC option list CuPy 14 compiles a RawModule with for compute capability `arch` (e.g. 90):
    ours, then what cupy.cuda.compiler adds ('-ftz=true', '-arch=sm_XX', '--device-as-default-execution-space').
    For the CI compile test; the runtime lets CuPy add them itself."""
    return list(OPTIONS) + ["-ftz=true", f"-arch=sm_{arch}", "--device-as-default-execution-space"]
