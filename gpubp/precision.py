"""GEMM operand precision: the names, their validation, and the numpy reference of a reduced-precision GEMM.

    Sequential(..., dtype="float32", precision="fp32" | "tf32" | "bf16" | "fp16")

`precision` is the type the operands of every GEMM (activations, weights, seeds δ) are rounded to before they
are multiplied; products are accumulated in float32 whatever the precision (issue 12). The model's dtype
(its parameters, optimizer state, Z and A buffers) stays float32: reduced precision is a property of the
GEMMs, not of the stored model, so only dtype="float32" takes a precision other than the default.

| precision | operand format                          | significand bits (incl. implicit) | storage in kernels |
|-----------|-----------------------------------------|-----------------------------------|--------------------|
| fp32      | IEEE binary32                           | 24                                | float32            |
| tf32      | binary32 with the low 13 mantissa bits 0 | 11 (8-bit exponent as float32)    | float32            |
| bf16      | bfloat16                                | 8  (8-bit exponent)               | 16 bits            |
| fp16      | IEEE binary16                           | 11 (5-bit exponent, max 65504)    | 16 bits            |

Rounding, as the reference does it (`round_operand`), all round-to-nearest, ties to even:
  - bf16: ml_dtypes.bfloat16 (RNE, as the hardware's cvt.rn.bf16.f32); fp16: numpy's float16 cast (RNE).
  - tf32: RNE at bit 13 of the float32 bit pattern (no numpy dtype exists). The kernels do the same: on sm_90
    with `cvt.rn.tf32.f32`, on sm_80 (whose cvt offers only .rna, ties AWAY from zero) with the same integer
    rounding as here (kernels/tensor_core.cuh), so reference and kernels agree bit for bit on the operands.
  - Overflow: a finite value past the format's largest finite value by half an ulp or more rounds to ±inf
    (RNE's rule: bf16 and tf32 share float32's exponent range, so only float32 values within half an ulp of
    FLT_MAX can overflow; fp16 overflows above 65519.99...: 65520 -> inf). No saturation.
  - inf stays inf; NaN stays NaN (sign kept, made quiet: a signalling NaN whose payload lies only in the
    dropped bits would otherwise turn into inf).
  - Subnormals: kept as the format represents them (bf16/tf32 share float32's subnormal range, rounded at
    the same bit; fp16 has its own, coarser ones). NOTE: CuPy compiles with -ftz=true and tensor cores may
    flush subnormal operands: tests compare kernels on normal-range data only.
"""
import numpy as np

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
DEFAULT_PRECISION = "fp32"
REDUCED = ("tf32", "bf16", "fp16")   # the tensor-core precisions

# What each precision means, for `gpubp info` and the README
NOTES = {
    "fp32": "float32 operands (the default; float64 models multiply in float64)",
    "tf32": "operands rounded to 10 mantissa bits inside the GEMM, float32 storage and accumulation",
    "bf16": "bfloat16 operands, hidden activations and deltas stored in 16 bits, float32 accumulation",
    "fp16": "float16 as bf16, with a dynamic loss scale on the device (overflow steps skipped)",
}

# Significand bits (implicit bit included) of each precision: unit roundoff u = 2^-SIGNIFICAND_BITS
SIGNIFICAND_BITS = {"fp32": 24, "tf32": 11, "bf16": 8, "fp16": 11}


def check_precision(precision, dtype="float32"):
    """The precision name for a model of `dtype`: None means the default (fp32 operands for float32; float64
    models always multiply in float64). ValueError naming both values for an unknown name or a combination
    that does not exist (a reduced precision, or "fp32", with dtype="float64")."""
    dtype_name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if precision is None:
        return DEFAULT_PRECISION if dtype_name == "float32" else None
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {list(PRECISIONS)}, got {precision!r}")
    if dtype_name != "float32":
        raise ValueError(f"precision={precision!r} needs dtype='float32' (GEMM operands are rounded from "
                         f"float32 and accumulated in float32), got dtype={dtype_name!r}: "
                         f"leave precision unset for a {dtype_name} model")
    return precision


def _check_name(precision):
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {list(PRECISIONS)}, got {precision!r}")


def round_tf32(x):
    """float32 array: x (cast to float32 first) rounded to tf32, nearest even at bit 13 of the bit pattern.

    Adding 0xFFF plus the kept part's lowest bit, then clearing the low 13 bits, is RNE: below half an ulp
    nothing carries; above it the carry rounds up; exactly half (0x1000) carries only when the kept lowest
    bit is 1 (odd), giving even. A carry out of the mantissa bumps the exponent, which is right (1.111..1
    rounds to 2.0), and out of the largest exponent gives the inf bit pattern: RNE overflow."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    rounded = (bits + np.uint32(0xFFF) + ((bits >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
    # inf/NaN (exponent all ones) must not go through the carry: NaN -> quiet NaN of the same sign, inf kept
    special = (bits & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
    nan = special & ((bits & np.uint32(0x007FFFFF)) != 0)
    rounded = np.where(special, bits & np.uint32(0xFFFFE000), rounded)
    rounded = np.where(nan, rounded | np.uint32(0x00400000), rounded)
    return rounded.astype(np.uint32).view(np.float32).reshape(x.shape)


def _bfloat16():
    try:
        import ml_dtypes
    except ImportError as exc:   # pragma: no cover - ml_dtypes comes with the test extra
        raise ImportError("precision='bf16' on the numpy reference needs ml_dtypes: pip install ml_dtypes") from exc
    return ml_dtypes.bfloat16


def storage_dtype(precision):
    """The numpy dtype a GEMM operand of `precision` is stored in on the device: float32 for fp32 and tf32
    (tf32 is rounded inside the kernel), bfloat16 / float16 for the 16-bit formats."""
    _check_name(precision)
    return {"fp32": np.dtype(np.float32), "tf32": np.dtype(np.float32),
            "bf16": np.dtype(_bfloat16()), "fp16": np.dtype(np.float16)}[precision]


def to_storage(x, precision):
    """x as a kernel takes it: float32 for fp32/tf32 (not pre-rounded), the 16-bit formats as their raw bits
    (uint16: the kernels use `unsigned short` storage, see kernels/tensor_core.cuh)."""
    stored = np.ascontiguousarray(np.asarray(x, dtype=np.float32).astype(storage_dtype(precision)))
    return stored.view(np.uint16) if stored.dtype.itemsize == 2 else stored


def decode(x, precision):
    """float32 values of a host copy of a stored operand: a float32 array as it is, ml_dtypes.bfloat16 or
    float16 cast (exact), and raw 16-bit bits (uint16, as the GPU backends may store bf16/fp16) read as
    `precision`'s format."""
    _check_name(precision)
    x = np.asarray(x)
    if x.dtype == np.uint16:
        if precision not in ("bf16", "fp16"):
            raise ValueError(f"decode: raw 16-bit storage holds bf16 or fp16, not precision={precision!r}")
        return x.view(storage_dtype(precision)).astype(np.float32)
    return x.astype(np.float32)


def round_operand(x, precision):
    """float32 array holding x rounded to `precision` (RNE; inf/NaN kept; see the module docstring).
    x is first cast to float32 (the model's dtype), so float64 input is rounded twice, as on the device."""
    _check_name(precision)
    x32 = np.asarray(x, dtype=np.float32)
    if precision == "fp32":
        return x32.copy()
    if precision == "tf32":
        return round_tf32(x32)
    with np.errstate(over="ignore"):   # overflow to inf is the documented behaviour
        return x32.astype(storage_dtype(precision)).astype(np.float32)


def reference_gemm(A, B, precision):
    """C (M, N) float32 = round(A) (M, K) · round(B)ᵀ (N, K)ᵀ: the tensor-core GEMM of kernels/gemm_tc.cu.

    Both operands are rounded to `precision`, then multiplied in float64 and the result rounded once to
    float32. Why float64: products of two rounded operands are exact in float64 (at most 2·24 = 48
    significand bits) and a float64 sum of K of them is within K·2^-53·Σ|a·b| of exact, far below one
    float32 ulp for every K we test. The reference is then (nearly) the exact result of the rounded operands,
    independent of summation order, and a kernel's deviation from it is its own float32 accumulation error
    only, which tests bound by γ·(|A|·|B|) with γ a few K/k_mma float32 ulps. A float32 reference would add
    numpy's (BLAS's) own order-dependent error to the comparison and force a looser tolerance."""
    a = round_operand(A, precision).astype(np.float64)
    b = round_operand(B, precision).astype(np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"reference_gemm: expected A (M, K) and B (N, K), got {a.shape} and {b.shape}")
    return (a @ b.T).astype(np.float32)
