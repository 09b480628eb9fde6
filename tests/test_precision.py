"""gpubp/precision.py: precision names and validation, the reference rounding of GEMM operands (tf32 bit-exact
on hand-computed cases, ties to even, inf/NaN, subnormals, overflow) and reference_gemm."""
import numpy as np
import pytest

from gpubp import precision as prec

ml_dtypes = pytest.importorskip("ml_dtypes")


def f32(bits):
    return np.array(bits, dtype=np.uint32).view(np.float32)


def bits(x):
    return np.asarray(x, dtype=np.float32).view(np.uint32)


# ---- names and validation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", prec.PRECISIONS)
def test_every_precision_is_accepted_with_float32(name):
    assert prec.check_precision(name, "float32") == name
    assert prec.check_precision(name, np.float32) == name


def test_default_precision():
    assert prec.check_precision(None, "float32") == "fp32"
    assert prec.check_precision(None, "float64") is None


@pytest.mark.parametrize("name", ["bf16", "fp16", "tf32", "fp32"])
def test_reduced_precision_with_float64_names_both_values(name):
    with pytest.raises(ValueError) as info:
        prec.check_precision(name, "float64")
    assert repr(name) in str(info.value) and "'float64'" in str(info.value)


@pytest.mark.parametrize("name", ["bfloat16", "FP16", "int8", "", 16])
def test_unknown_precision_names_the_choices(name):
    with pytest.raises(ValueError, match="precision: expected one of") as info:
        prec.check_precision(name)
    assert repr(name) in str(info.value)
    with pytest.raises(ValueError):
        prec.round_operand(np.ones(2), name)


# ---- tf32, bit for bit --------------------------------------------------------------------------------------------
# Hand-computed: tf32 keeps bits 31..13; bit 12 is the half-ulp bit.
TF32_CASES = [
    (0x3F800000, 0x3F800000),   # 1.0 exact
    (0x3F800FFF, 0x3F800000),   # just below half an ulp: down
    (0x3F801000, 0x3F800000),   # 1 + 2^-11, exactly half: tie, kept lsb (bit 13) is 0 -> stays (even)
    (0x3F801001, 0x3F802000),   # just above half: up
    (0x3F803000, 0x3F804000),   # 1 + 3·2^-11, tie with kept lsb 1 (odd) -> up to even
    (0x3F802000, 0x3F802000),   # representable
    (0xBF801000, 0xBF800000),   # the sign does not change the tie rule
    (0xBF803000, 0xBF804000),
    (0x3FFFF000, 0x40000000),   # 1.99987..., tie with odd lsb: the carry bumps the exponent -> 2.0
    (0x7F7FEFFF, 0x7F7FE000),   # below half an ulp under FLT_MAX's tf32 neighbour: stays finite
    (0x7F7FF000, 0x7F800000),   # tie at the top, kept lsb 1 -> rounds up: overflow to +inf (RNE, no saturation)
    (0x7F7FFFFF, 0x7F800000),   # FLT_MAX -> +inf
    (0x00001000, 0x00000000),   # subnormal tie with even lsb -> +0
    (0x00003000, 0x00004000),   # subnormal tie with odd lsb -> up
    (0x00001001, 0x00002000),   # smallest tf32 subnormal is 2^-136 (bit 13)
    (0x007FF000, 0x00800000),   # largest subnormals round up into the normal range
    (0x80000000, 0x80000000),   # -0
    (0x7F800000, 0x7F800000),   # +inf
    (0xFF800000, 0xFF800000),   # -inf
]


@pytest.mark.parametrize("given,expected", TF32_CASES, ids=[f"{g:08x}" for g, _ in TF32_CASES])
def test_tf32_rounding_bit_exact(given, expected):
    assert int(bits(prec.round_operand(f32([given]), "tf32"))[0]) == expected


@pytest.mark.parametrize("nan_bits", [0x7FC00000, 0x7F800001, 0xFF800001, 0x7F801000, 0x7FBFFFFF])
def test_tf32_keeps_nan_and_its_sign(nan_bits):
    """0x7F800001 is a NaN whose payload lies only in the dropped bits: truncating it would give inf."""
    out = prec.round_operand(f32([nan_bits]), "tf32")
    assert np.isnan(out[0])
    assert (bits(out)[0] >> 31) == (nan_bits >> 31)
    assert bits(out)[0] & 0x1FFF == 0


def test_tf32_matches_an_independent_rounding(rng):
    """Round the significand with numpy's half-to-even np.round, away from the bit tricks, on normal numbers
    of every magnitude, plus many exact ties."""
    x = (rng.standard_normal(20000) * np.exp2(rng.integers(-100, 100, 20000))).astype(np.float32)
    ties = ((bits(x) & np.uint32(0xFFFFE000)) | np.uint32(0x1000)).view(np.float32)
    x = np.concatenate([x, ties])
    m, e = np.frexp(x.astype(np.float64))            # x = m·2^e, 0.5 <= |m| < 1: 11 significand bits kept
    expected = (np.round(m * 2.0**11) / 2.0**11 * np.exp2(e)).astype(np.float32)
    np.testing.assert_array_equal(bits(prec.round_tf32(x)), bits(expected))


def test_tf32_shape_and_dtype_kept():
    x = np.arange(12, dtype=np.float64).reshape(3, 4) / 7
    out = prec.round_operand(x, "tf32")
    assert out.shape == (3, 4) and out.dtype == np.float32


# ---- bf16, fp16, fp32 -----------------------------------------------------------------------------------------------
def test_bf16_is_ml_dtypes_round_to_nearest_even():
    # 1 + 2^-8 is the tie between 1 and 1 + 2^-7: even -> 1; 1 + 3·2^-8 -> 1 + 2^-6 (even)
    x = np.array([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -(1 + 2**-8)], dtype=np.float32)
    np.testing.assert_array_equal(prec.round_operand(x, "bf16"), [1, 1 + 2**-6, 1 + 2**-7, -1])
    y = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    np.testing.assert_array_equal(prec.round_operand(y, "bf16"),
                                  y.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_bf16_and_fp16_special_values():
    x = np.array([np.inf, -np.inf, np.nan, 3.0e38, 65504, 65519, 65520, 1e-8], dtype=np.float32)
    b = prec.round_operand(x, "bf16")
    assert b[0] == np.inf and b[1] == -np.inf and np.isnan(b[2]) and np.isfinite(b[3])
    h = prec.round_operand(x, "fp16")
    assert h[0] == np.inf and h[1] == -np.inf and np.isnan(h[2])
    assert h[3] == np.inf                     # past fp16's range: inf, no saturation
    assert h[4] == 65504 and h[5] == 65504    # 65519 is below the half-ulp point
    assert h[6] == np.inf                     # 65520 is the tie with the (absent) 65536: overflows
    assert h[7] == np.float32(np.float16(1e-8))   # fp16 subnormal (2^-24 steps): kept as fp16 has it


def test_fp32_is_a_float32_copy():
    x = np.array([1 + 2**-20, np.nan], dtype=np.float64)
    out = prec.round_operand(x, "fp32")
    assert out.dtype == np.float32 and out[0] == np.float32(1 + 2**-20) and np.isnan(out[1])


@pytest.mark.parametrize("name", prec.PRECISIONS)
def test_to_storage_round_trips_through_the_kernel_format(name, rng):
    x = rng.standard_normal((5, 7)).astype(np.float32)
    stored = prec.to_storage(x, name)
    assert stored.flags.c_contiguous and stored.shape == x.shape
    assert stored.dtype == (np.uint16 if name in ("bf16", "fp16") else np.float32)
    as_float = stored.view(prec.storage_dtype(name)).astype(np.float32)
    if name == "tf32":   # stored unrounded; the kernel rounds
        np.testing.assert_array_equal(as_float, x)
    else:
        np.testing.assert_array_equal(as_float, prec.round_operand(x, name))


# ---- reference_gemm ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", prec.PRECISIONS)
def test_reference_gemm_is_the_product_of_rounded_operands(name, rng):
    A = rng.standard_normal((7, 33))
    B = rng.standard_normal((5, 33))
    C = prec.reference_gemm(A, B, name)
    assert C.shape == (7, 5) and C.dtype == np.float32
    exact = prec.round_operand(A, name).astype(np.float64) @ prec.round_operand(B, name).astype(np.float64).T
    np.testing.assert_array_equal(C, exact.astype(np.float32))


def test_reference_gemm_rounds_before_multiplying():
    # 1 + 2^-9 is lost in bf16 (8 significand bits), kept in tf32 and fp16 (11): a product that tells them apart
    A = np.array([[1 + 2**-9]], dtype=np.float32)
    B = np.array([[1.0]], dtype=np.float32)
    assert prec.reference_gemm(A, B, "bf16")[0, 0] == 1.0
    assert prec.reference_gemm(A, B, "tf32")[0, 0] == np.float32(1 + 2**-9)
    assert prec.reference_gemm(A, B, "fp16")[0, 0] == np.float32(1 + 2**-9)


def test_reference_gemm_shape_errors():
    with pytest.raises(ValueError, match=r"\(3, 4\) and \(2, 5\)"):
        prec.reference_gemm(np.ones((3, 4)), np.ones((2, 5)), "bf16")
