"""The cupy backend on a CPU: kernels/*.cu built with g++ against cuda_cpu.h (harness.cpp), and the pieces
that let CupyBackend run unchanged on numpy arrays (see tests/test_cupy_kernels_emulated.py).

    lib = build(directory)                       # compile the kernels for the CPU; ctypes library
    for module, name, value in patches(lib, sm_count):
        setattr(module, name, value)             # (or monkeypatch.setattr) CupyBackend now runs on the CPU

Stream capture is modelled at the level CUDA graphs work at: between Stream.begin_capture and end_capture,
kernel launches are recorded (kernel, grid, block, arguments: the same arrays, as a graph keeps the same
device pointers), not run; Graph.launch runs the recording again.
"""
import contextlib
import ctypes
import pathlib
import shutil
import subprocess
import types

import numpy as np

from gpubp.backends import cuda_sources, cupy_backend

HERE = pathlib.Path(__file__).parent


def build(directory):
    """Compile harness.cpp into directory/kernels_emulated.so and load it. RuntimeError when g++ is missing
    (the caller skips) or fails (the caller fails: the kernels do not build)."""
    if shutil.which("g++") is None:
        raise FileNotFoundError("g++ is not installed: the CPU emulation of the CUDA kernels needs it")
    library = pathlib.Path(directory) / "kernels_emulated.so"
    command = ["g++", "-std=c++20", "-O1", "-fsanitize=alignment", "-fno-sanitize-recover=alignment",
               "-shared", "-fPIC", "-I", str(cuda_sources.kernels_dir()), "-I", str(HERE),
               str(HERE / "harness.cpp"), "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"g++ could not build the emulation:\n{result.stderr[-5000:]}")
    lib = ctypes.CDLL(str(library))
    lib.emu_signature.restype = ctypes.c_char_p
    lib.emu_signature.argtypes = [ctypes.c_char_p]
    lib.emu_launch_kernel.restype = ctypes.c_int
    lib.emu_launch_kernel.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 4 + [ctypes.c_void_p]
    return lib


class EmulatedKernel:
    """Stands in for a cupy RawKernel: kernel(grid, block, args), each argument checked against the kernel's
    parameter types (CuPy checks none: a Python int would arrive as a long long)."""

    POINTERS = {"f": np.float32, "D": np.float64, "L": np.int64, "H": np.uint16}
    SCALARS = {"i": (np.int32, ctypes.c_int32), "q": (np.int64, ctypes.c_int64), "d": (np.float64, ctypes.c_double)}

    def __init__(self, lib, name):
        signature = lib.emu_signature(name.encode())
        assert signature is not None, f"the emulation harness has no kernel {name!r}"
        self.lib, self.name, self.signature = lib, name, signature.decode()

    def __call__(self, grid, block, args):
        if _capturing is not None:
            _capturing.append((self, grid, block, args))
            return
        assert len(args) == len(self.signature), f"{self.name}: {len(args)} arguments for {self.signature}"
        values = []
        for i, (arg, code) in enumerate(zip(args, self.signature)):
            if code in self.POINTERS:
                assert isinstance(arg, np.ndarray), f"{self.name} argument {i}: expected an array, got {arg!r}"
                assert arg.dtype == self.POINTERS[code] and arg.flags.c_contiguous, \
                    f"{self.name} argument {i}: expected contiguous {self.POINTERS[code]}, got {arg.dtype}"
                values.append(ctypes.c_void_p(arg.ctypes.data))
            else:
                numpy_type, c_type = self.SCALARS[code]
                assert type(arg) is numpy_type, f"{self.name} argument {i}: expected {numpy_type}, got {type(arg)}"
                values.append(c_type(arg))
        pointers = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        assert all(g >= 1 for g in grid) and len(block) == 1 and 1 <= block[0] <= 1024
        assert self.lib.emu_launch_kernel(self.name.encode(), *grid, int(block[0]), pointers) == 0


_capturing = None   # the launches recorded by the stream being captured, or None


class FakeStream:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def begin_capture(self, mode=None):
        global _capturing
        assert _capturing is None, "nested capture"
        _capturing = []

    def end_capture(self):
        global _capturing
        launches, _capturing = _capturing, None
        return FakeGraph(launches)


class FakeGraph:
    def __init__(self, launches):
        self.launches = launches

    def launch(self, stream=None):
        for kernel, grid, block, args in self.launches:
            kernel(grid, block, args)


def _poisoned_empty(shape, dtype):
    """cupy.empty as the tests want it: NaN (or -7) where a kernel has not written."""
    return np.full(shape, np.nan if np.dtype(dtype).kind == "f" else -7, dtype)


def fake_cupy():
    """The part of the cupy module CupyBackend uses, on numpy ("device" arrays are numpy arrays)."""
    return types.SimpleNamespace(
        ndarray=np.ndarray, zeros=np.zeros, full=np.full, empty=_poisoned_empty, asarray=np.asarray,
        ascontiguousarray=np.ascontiguousarray, copyto=np.copyto, isfinite=np.isfinite, stack=np.stack,
        asnumpy=lambda x: np.array(x, copy=True),
        cuda=types.SimpleNamespace(
            runtime=types.SimpleNamespace(getDevice=lambda: 0),
            Stream=lambda non_blocking=False: FakeStream(), get_current_stream=FakeStream,
            MemoryPool=lambda: types.SimpleNamespace(malloc=None),
            using_allocator=lambda allocator=None: contextlib.nullcontext()))


def patches(lib, sm_count):
    """(module, attribute, value) triples that put cupy_backend on the emulator, with a GPU of sm_count SMs."""
    return [(cupy_backend, "cp", fake_cupy()),
            (cupy_backend, "_kernel", lambda filename, name: EmulatedKernel(lib, name)),
            (cupy_backend, "_sm_count", lambda: sm_count)]
