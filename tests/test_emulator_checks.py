"""The CUDA emulation's own checks fire: tests/cuda_emulation/planted_bugs.cu holds test-only kernels with
deliberate bugs (a missing __syncthreads, a barrier some threads skip, stores and a load one element outside
an array, shared memory over 48 KiB), and here each must be caught, while the same kernels without the bug
pass. See tests/cuda_emulation/cuda_cpu.h and emulator.py for what is checked.

test_kernels_under_address_sanitizer runs these tests again, and the kernel tests of
test_cupy_kernels_emulated.py, in a process with an AddressSanitizer build, where a load outside an array
argument fails its launch too (elsewhere it reads NaN).
"""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from cuda_emulation import emulator as emulator_module
from cuda_emulation.emulator import EmulatedKernel, EmulationError

SEEDS = [1, 2, 3]


def shared_kernel(emulator, x, bug, seed, threads=64):
    """planted_shared_kernel: out[i] = x[i - 1] within a block (x[i] for a block's thread 0)."""
    emulator_module.set_seed(emulator, seed)
    out = np.zeros_like(x)
    blocks = -(-x.size // threads)
    EmulatedKernel(emulator, "planted_shared_kernel")((blocks,), (threads,),
                                                      (x, out, np.int32(x.size), np.int32(bug)))
    return out


# ---- schedule and shared memory -------------------------------------------------------------------------------
def test_missing_barrier_is_caught_under_every_seed(emulator):
    """Without the barrier a thread reads its neighbour's slot before the neighbour stored it. In thread order
    (the old schedule) the neighbour always ran first and the bug passed; in a shuffled order some thread
    runs first, and reads the shared memory's block-start poison (NaN), not the previous block's values."""
    x = np.arange(1, 201, dtype=np.float32)
    expected = np.where(np.arange(200) % 64 == 0, x, np.roll(x, 1))
    patterns = []
    for seed in SEEDS:
        np.testing.assert_array_equal(shared_kernel(emulator, x, 0, seed), expected)   # with the barrier
        racy = shared_kernel(emulator, x, 1, seed)
        assert np.isnan(racy).any(), f"seed {seed}: the missing barrier went unnoticed"
        patterns.append(np.isnan(racy))
        np.testing.assert_array_equal(np.isnan(shared_kernel(emulator, x, 1, seed)), patterns[-1])   # seeded
    assert any((p != patterns[0]).any() for p in patterns[1:]), "every seed gave the same schedule"


def test_barrier_skipped_by_some_threads_fails_the_launch(emulator):
    with pytest.raises(EmulationError, match=r"planted_shared_kernel: block \(\d+,0,0\) deadlocked: 63 of 64"):
        shared_kernel(emulator, np.ones(64, np.float32), 2, seed=1)


def test_static_shared_memory_is_limited_to_48_KiB(emulator):
    out = np.zeros(2, np.float32)
    EmulatedKernel(emulator, "planted_shared_size_kernel<49152>")((2,), (32,), (out,))
    np.testing.assert_array_equal(out, 1)
    with pytest.raises(EmulationError, match=r"planted_shared_size_kernel<49156>: 49156 bytes of __shared__"):
        EmulatedKernel(emulator, "planted_shared_size_kernel<49156>")((2,), (32,), (out,))


# ---- global memory --------------------------------------------------------------------------------------------
def bounds_kernel(emulator, x, out, bug, grid=(3,), threads=32):
    EmulatedKernel(emulator, "planted_bounds_kernel")(grid, (threads,), (x, out, np.int32(x.size), np.int32(bug)))


def test_store_past_the_end_fails_the_launch_and_spares_neighbours(emulator):
    """out is a view inside a larger buffer: on the emulator it lives in an allocation of its own, so the
    stray store lands in a guard zone (and fails the launch), not in the buffer's next element."""
    x = np.arange(100, dtype=np.float32)
    buffer = np.full(120, 7.0, np.float32)
    out = buffer[10:110]
    with pytest.raises(EmulationError, match=r"planted_bounds_kernel wrote outside argument 1 \(out, float32 "
                                             r"\(100,\)\): 1 elements, at 100 \.\. 100 of an array of 100"):
        bounds_kernel(emulator, x, out, bug=1)
    assert (buffer[:10] == 7).all() and (buffer[110:] == 7).all()
    bounds_kernel(emulator, x, out, bug=0)
    np.testing.assert_array_equal(out, 2 * x)


def test_store_before_the_start_fails_the_launch(emulator):
    x = np.arange(100, dtype=np.float32)
    with pytest.raises(EmulationError, match=r"wrote outside argument 1 \(out, .*1 elements, at -1 \.\. -1 of"):
        bounds_kernel(emulator, x, np.zeros_like(x), bug=2)


def test_load_past_the_end_reads_nan_or_fails_under_asan(emulator):
    x, out = np.arange(100, dtype=np.float32), np.zeros(100, np.float32)
    if emulator.asan:
        with pytest.raises(EmulationError, match=r"planted_bounds_kernel read outside argument 0 \(x, float32 "
                                                 r"\(100,\)\): 1 elements, at 100 \.\. 100 of an array of 100"):
            bounds_kernel(emulator, x, out, bug=3)
    else:
        bounds_kernel(emulator, x, out, bug=3)
        assert np.isnan(out[-1]) and np.isfinite(out[:-1]).all()


def test_loop_bound_off_by_one_fails_the_launch(emulator):
    """The store past the end writes what the load past the end read: the guard's own NaN, moved to the
    other array's guard, must still show (each guard element has bits of its own)."""
    x, out = np.arange(100, dtype=np.float32), np.zeros(100, np.float32)
    failure = r"read outside argument 0 \(x" if emulator.asan else r"wrote outside argument 1 \(out"
    with pytest.raises(EmulationError, match=r"planted_bounds_kernel " + failure):
        bounds_kernel(emulator, x, out, bug=4)


def test_arguments_that_share_memory_share_one_copy(emulator):
    """In place (x and out the same array) the kernel must see its own stores, as on a GPU."""
    x = np.arange(100, dtype=np.float32)
    bounds_kernel(emulator, x, x, bug=0)
    np.testing.assert_array_equal(x, 2 * np.arange(100))


# ---- launch limits --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid, threads, message", [
    ((2**31, 1, 1), 32, r"grid \(2147483648, 1, 1\) is outside the limits"),
    ((1, 65536, 1), 32, r"grid \(1, 65536, 1\) is outside the limits"),
    ((1, 1, 65536), 32, r"grid \(1, 1, 65536\) is outside the limits"),
    ((0, 1, 1), 32, r"grid \(0, 1, 1\) is outside the limits"),
    ((1,), 1025, r"1025 threads a block"),
    ((1,), 0, r"0 threads a block"),
], ids=["grid-x", "grid-y", "grid-z", "empty-grid", "1025-threads", "no-threads"])
def test_launch_limits(emulator, grid, threads, message):
    x = np.zeros(0, np.float32)
    with pytest.raises(EmulationError, match=r"planted_bounds_kernel: " + message):
        bounds_kernel(emulator, x, x.copy(), bug=0, grid=grid, threads=threads)


def test_launches_at_the_limits_run(emulator):
    x = np.arange(2048, dtype=np.float32)
    out = np.zeros_like(x)
    bounds_kernel(emulator, x, out, bug=0, grid=(2,), threads=1024)
    np.testing.assert_array_equal(out, 2 * x)
    bounds_kernel(emulator, np.zeros(0, np.float32), np.zeros(0, np.float32), bug=0, grid=(1, 65535, 1), threads=1)


# ---- the source rewrite that registers shared arrays ------------------------------------------------------------
def test_shared_declarations_the_emulation_cannot_register_fail_the_build():
    ok = "    __shared__ __align__(16) T As[2][BK][BM + 4];  // a comment: __shared__ x[3], y;\n"
    assert "EMU_SHARED_DECLARED(As);" in emulator_module.register_shared_arrays(ok, "ok.cu")
    for bad in ("    extern __shared__ float dynamic[];\n", "    __shared__ float a[4], b[4];\n",
                "    __shared__ float scalar;\n"):
        with pytest.raises(RuntimeError, match="bad.cu: 1 __shared__ declarations"):
            emulator_module.register_shared_arrays(bad, "bad.cu")


# ---- AddressSanitizer ------------------------------------------------------------------------------------------
# The kernel set's tests under AddressSanitizer: one tile choice and float32 (about a quarter of them, every
# kernel still launched), without the slower schedule, graph, fit and subprocess ones
ASAN_KERNEL_TESTS = ("large-tile and float32 and not project and not schedule and not graph and not uncapturable"
                     " and not recaptured and not fit")


@pytest.mark.slow
def test_kernels_under_address_sanitizer(emulator):
    if emulator.asan:
        pytest.skip("this is the AddressSanitizer run")
    tests_dir = pathlib.Path(__file__).parent
    env = dict(os.environ, **emulator_module.asan_environment(),
               PYTHONPATH=os.pathsep.join(filter(None, [str(tests_dir), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests_dir / "test_emulator_checks.py"),
         str(tests_dir / "test_cupy_kernels_emulated.py"), "-k", f"test_emulator_checks or ({ASAN_KERNEL_TESTS})"],
        capture_output=True, text=True, env=env, cwd=tests_dir.parent, timeout=1800)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
