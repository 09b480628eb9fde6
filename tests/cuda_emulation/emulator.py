"""The cupy backend on a CPU: kernels/*.cu built with g++ against cuda_cpu.h (harness.cpp), and the pieces
that let CupyBackend run unchanged on numpy arrays (see tests/test_cupy_kernels_emulated.py).

    lib = build(directory)                       # compile the kernels for the CPU; ctypes library
    for module, name, value in patches(lib, sm_count):
        setattr(module, name, value)             # (or monkeypatch.setattr) CupyBackend now runs on the CPU

What every emulated launch checks (EmulationError names the kernel when one fails):
  - each argument's type against the kernel's parameter list (CuPy checks none);
  - global memory: each array argument is copied into an allocation of its own between guard zones of
    signaling NaN (guard_pattern), and copied back after the launch. A write outside the argument's extent
    fails the launch, naming the argument; a read outside it reads NaN, which shows in the results.
    Built with GPUBP_EMULATION_ASAN=1 (AddressSanitizer; run in a process started with asan_environment())
    the guard zones are poisoned for ASan, and a read outside an argument fails the launch too.
    Arguments whose memory overlaps (the same array twice, in-place operations) share one allocation;
  - launch limits, deadlocks and the 48 KiB of static shared memory (cuda_cpu.h);
  - threads and blocks run in a seeded random order (cuda_cpu.h): set_seed(lib, seed), or the environment
    variable GPUBP_EMULATION_SEED (default 0) read by build();
  - shared memory starts each block as 0xFF bytes: build() puts EMU_SHARED_DECLARED(name) after each
    __shared__ declaration of the sources it compiles (register_shared_arrays).

Stream capture is modelled at the level CUDA graphs work at: between Stream.begin_capture and end_capture,
kernel launches are recorded (kernel, grid, block, arguments: the same arrays, as a graph keeps the same
device pointers), not run; Graph.launch runs the recording again.
"""
import contextlib
import ctypes
import functools
import hashlib
import itertools
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import types

import numpy as np

from gpubp.backends import cuda_sources, cupy_backend

HERE = pathlib.Path(__file__).parent
TEST_KERNELS = HERE / "planted_bugs.cu"   # test-only kernels with deliberate bugs, built into the harness
TC_PROBES = HERE / "tc_probes.cu"         # test-only probes of the emulated tensor-core instructions
HEADERS = ("cuda_cpu.h", "tensor_core_cpu.h")   # the emulation itself (found through -I, part of the cache key)


class EmulationError(RuntimeError):
    """A launch the emulator refused or caught doing something a GPU would not forgive."""


# A __shared__ declaration, up to its semicolon, and the name of the array it declares. Declarations are
# statements: they start a line (so comments that mention __shared__ are left alone).
_SHARED_DECLARATION = re.compile(r"^([ \t]*__shared__\b[^;]*?\b([A-Za-z_]\w*)\s*\[[^;]*;)", re.MULTILINE)


def register_shared_arrays(text, filename):
    """text with EMU_SHARED_DECLARED(name); after each `__shared__ ... name[...];` declaration, so that
    cuda_cpu.h sees every shared array a kernel declares (to poison it at block start and to add up its
    size). RuntimeError for a __shared__ it cannot register (extern, no array, two names in one statement):
    an unregistered array would silently keep the previous block's values."""
    code = re.sub(r"//.*", "", text)
    declared = len(re.findall(r"\b__shared__\b", code))
    text, registered = _SHARED_DECLARATION.subn(r"\1 EMU_SHARED_DECLARED(\2);", text)
    if registered != declared or re.search(r"__shared__[^;]*,", code):
        raise RuntimeError(f"{filename}: {declared} __shared__ declarations, {registered} of them of the form "
                           "`__shared__ [attributes] type name[size]...;` that the emulation can register")
    return text


def _sources():
    """{file name: text} of what the harness compiles: kernels/*.cu and *.cuh, and the test kernels."""
    kernels = cuda_sources.kernels_dir()
    texts = {f.name: f.read_text(encoding="utf-8") for f in kernels.iterdir() if f.name.endswith((".cu", ".cuh"))}
    for test_file in (TEST_KERNELS, TC_PROBES):
        texts[test_file.name] = test_file.read_text(encoding="utf-8")
    return texts


@functools.cache
def parameter_names(kernel):
    """The parameter names of a kernel (its name expression, or the name alone) as its source declares
    them, for messages; None where the source cannot be read that simply."""
    base = kernel.split("<")[0].strip()
    for text in _sources().values():
        match = re.search(rf"\b{base}\s*\(([^)]*)\)\s*\{{", text)
        if match:
            return [re.findall(r"\w+", p)[-1] for p in match.group(1).split(",")]
    return None


def set_seed(lib, seed):
    """The schedule (thread and block order) of every launch from now on."""
    lib.emu_set_seed(int(seed))


def asan_environment():
    """The environment variables a Python process needs to load an ASan build (GPUBP_EMULATION_ASAN=1):
    Python itself is not built with ASan, so its runtime must be preloaded; reports must not end the
    process (each fails its launch instead); Python's own allocations are not leaks to report."""
    libasan = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return {"GPUBP_EMULATION_ASAN": "1", "LD_PRELOAD": os.path.realpath(libasan),
            "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=0"}


def rerun_under_asan(test_file, selection):
    """Run the tests of `test_file` that `selection` (a pytest -k expression) picks again, in a pytest process of
    their own on the AddressSanitizer build: every array argument then sits between poisoned guard zones, so a
    load or cp.async one byte outside its array fails its launch. (None, reason) where this already is that
    process; else (ok, the output's tail)."""
    if os.environ.get("GPUBP_EMULATION_ASAN") == "1":
        return None, "this is the AddressSanitizer run"
    tests_dir = HERE.parent
    env = dict(os.environ, **asan_environment(),
               PYTHONPATH=os.pathsep.join(filter(None, [str(tests_dir), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file), "-k",
                             selection], capture_output=True, text=True, env=env, cwd=tests_dir.parent,
                            timeout=1800)
    ok = result.returncode == 0 and " passed" in result.stdout and " failed" not in result.stdout
    return ok, result.stdout[-8000:] + result.stderr[-3000:]


def build(directory):
    """Compile harness.cpp (with AddressSanitizer when GPUBP_EMULATION_ASAN=1) and load it. The library is
    kept in the temporary folder under a hash of everything that goes into it (sources, flags, compiler), so
    the test modules and subprocesses of one run, and later runs, compile it once. FileNotFoundError when
    g++ is missing (the caller skips); RuntimeError when it fails (the caller fails: the kernels do not
    build)."""
    if shutil.which("g++") is None:
        raise FileNotFoundError("g++ is not installed: the CPU emulation of the CUDA kernels needs it")
    directory = pathlib.Path(directory)
    sources = directory / "sources"   # the kernels as compiled here: shared arrays registered
    sources.mkdir(exist_ok=True)
    texts = {name: register_shared_arrays(text, name) for name, text in _sources().items()}
    texts["harness.cpp"] = (HERE / "harness.cpp").read_text(encoding="utf-8")   # beside them: #include "..."
    for name, text in texts.items():                                            # looks there first
        (sources / name).write_text(text, encoding="utf-8")
    asan = os.environ.get("GPUBP_EMULATION_ASAN") == "1"
    if asan and "libasan" not in pathlib.Path("/proc/self/maps").read_text():
        raise RuntimeError("GPUBP_EMULATION_ASAN=1 needs the ASan runtime preloaded: start Python with "
                           "emulator.asan_environment()")
    flags = ["-std=c++20", "-O1", "-fno-sanitize-recover=alignment", "-shared", "-fPIC"]
    flags += ["-fsanitize=alignment,address", "-fsanitize-recover=address"] if asan else ["-fsanitize=alignment"]
    compiler = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(repr([flags, compiler, sorted(texts.items()),
                               [(HERE / h).read_text(encoding="utf-8") for h in HEADERS]]).encode()).hexdigest()[:20]
    library = pathlib.Path(tempfile.gettempdir()) / f"gpubp-emulated-kernels-{key}.so"
    if not library.exists():
        built = directory / "kernels_emulated.so"
        command = ["g++", *flags, "-I", str(HERE), str(sources / "harness.cpp"), "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"g++ could not build the emulation:\n{result.stderr[-5000:]}")
        partial = library.with_name(f"{library.name}.{os.getpid()}")
        shutil.copy(built, partial)
        os.replace(partial, library)   # atomic: a process beside this one loads a whole file or builds its own
    lib = ctypes.CDLL(str(library))
    lib.emu_signature.restype = ctypes.c_char_p
    lib.emu_signature.argtypes = [ctypes.c_char_p]
    lib.emu_launch_kernel.restype = ctypes.c_int
    lib.emu_launch_kernel.argtypes = [ctypes.c_char_p] + [ctypes.c_ulonglong] * 4 + [ctypes.c_void_p]
    lib.emu_last_error.restype = ctypes.c_char_p
    lib.emu_set_seed.argtypes = [ctypes.c_ulonglong]
    lib.emu_guard.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong, ctypes.c_int]
    lib.emu_stray_access.argtypes = [ctypes.POINTER(ctypes.c_ulonglong)]
    lib.asan = asan
    set_seed(lib, int(os.environ.get("GPUBP_EMULATION_SEED", "0")))
    return lib


# ---- global memory: each array argument in an allocation of its own ---------------------------------------------
GUARD_MIN_BYTES = 1024   # each guard zone: this, or the size of what it guards where that is more
_copies_made = itertools.count(1)


def guard_pattern(dtype, count, salt):
    """count elements of signaling NaN (as float32 or float64; int64 gets the float64 bits), each with its own
    payload, different from copy to copy (salt). A stray store cannot leave a guard as it was: arithmetic
    quiets a signaling NaN, and a value moved from any other place, guard or not, has other bits."""
    if np.dtype(dtype).itemsize == 4:
        exponent, payloads = np.uint32(0x7F800000), 2**22 - 1   # quiet bit (22) clear: signaling
        kind = np.uint32
    else:
        exponent, payloads = np.uint64(0x7FF0000000000000), 2**51 - 1
        kind = np.uint64
    payload = (salt * 1_000_003 + np.arange(count, dtype=np.int64)) % payloads + 1
    return (payload.astype(kind) | exponent).view(np.uint8)


class GuardedCopy:
    """Arguments whose memory overlaps (one array, or several views of overlapping memory), copied as one
    region of `size` bytes into a buffer of their own between guard zones (guard_pattern of the first
    array's dtype). The region keeps its address modulo 64, so 16-byte alignment (and misalignment, which
    tests use) is as in the original. In an ASan build the guard zones are poisoned until release()."""

    def __init__(self, lib, start, size, dtype):
        guard = -(-max(GUARD_MIN_BYTES, size) // 64) * 64
        self.begin = guard + (start - guard) % 64   # index of the region's first byte: start's address mod 64
        self.buffer = np.empty(self.begin + size + guard + 64, np.uint8)
        self.buffer = self.buffer[-self.buffer.ctypes.data % 64:][:self.begin + size + guard]   # 64-byte aligned
        self.start, self.size = start, size
        # one run of guard elements, split where the region goes: the lead ends where the region's first
        # element begins and the trail starts where its last ends, so guard elements line up with its elements
        half = (self.begin // 8 + 1) * 8
        pattern = guard_pattern(dtype, (half + guard) // np.dtype(dtype).itemsize + 1, next(_copies_made))
        self.lead, self.trail = pattern[half - self.begin:half], pattern[half:half + guard]
        self.buffer[:self.begin], self.buffer[self.begin + size:] = self.lead, self.trail
        ctypes.memmove(self.buffer.ctypes.data + self.begin, start, size)
        self.before = self.buffer[self.begin:self.begin + size].copy()
        self.lib = lib
        self._guard(poison=1)

    def _guard(self, poison):
        # ASan poisons whole 8-byte granules: a float32 region starting mid-granule leaves the 4 guard bytes
        # before it unpoisoned (a load there still reads NaN, a store there still changes the guard)
        self.lib.emu_guard(self.buffer.ctypes.data, self.begin, poison)
        self.lib.emu_guard(self.buffer.ctypes.data + self.begin + self.size, self.buffer.size - self.begin - self.size,
                           poison)

    def release(self):
        """Unpoisons the guard zones: the buffer goes back to the allocator, which may hand it to numpy."""
        self._guard(poison=0)

    def offset(self, address):
        """address as an offset from the region's start, when it is in this buffer; else None."""
        index = address - self.buffer.ctypes.data
        return index - self.begin if 0 <= index < self.buffer.size else None

    def address(self, original):
        """Where an original address inside the region is in the copy."""
        return self.buffer.ctypes.data + self.begin + (original - self.start)

    def bytes_written_outside(self):
        """Offsets from the region's start of the guard bytes that changed (negative: before the start)."""
        end = self.begin + self.size
        before = np.flatnonzero(self.buffer[:self.begin] != self.lead) - self.begin
        after = np.flatnonzero(self.buffer[end:] != self.trail) + self.size
        return np.concatenate([before, after])

    def copy_back(self):
        """Only where the launch changed something: inputs may live in read-only memory (np.load(mmap_mode='r'))."""
        if not np.array_equal(self.buffer[self.begin:self.begin + self.size], self.before):
            ctypes.memmove(self.start, self.buffer.ctypes.data + self.begin, self.size)


def guarded_copies(lib, arrays):
    """[(GuardedCopy, [argument index, ...])] for {index: array}: overlapping arrays share a copy."""
    spans = sorted((a.ctypes.data, a.ctypes.data + a.nbytes, i) for i, a in arrays.items())
    groups = []   # [start, end, indices]
    for start, end, i in spans:
        if groups and start < groups[-1][1]:
            groups[-1][1] = max(groups[-1][1], end)
            groups[-1][2].append(i)
        else:
            groups.append([start, end, [i]])
    return [(GuardedCopy(lib, start, end - start, arrays[indices[0]].dtype), indices)
            for start, end, indices in groups]


class EmulatedKernel:
    """Stands in for a cupy RawKernel: kernel(grid, block, args), checked as the module docstring says."""

    POINTERS = {"f": np.float32, "D": np.float64, "L": np.int64, "H": np.uint16}
    SCALARS = {"i": (np.int32, ctypes.c_int32), "q": (np.int64, ctypes.c_int64), "d": (np.float64, ctypes.c_double)}

    def __init__(self, lib, name):
        signature = lib.emu_signature(name.encode())
        assert signature is not None, f"the emulation harness has no kernel {name!r}"
        self.lib, self.name, self.signature = lib, name, signature.decode()
        names = parameter_names(name)
        self.parameters = names if names and len(names) == len(self.signature) else [None] * len(self.signature)

    def describe(self, i, arg=None):
        """'argument 2 (dW, float32 (7, 5))': how messages name an argument."""
        what = ", ".join(filter(None, [self.parameters[i], arg is not None and f"{arg.dtype} {arg.shape}"]))
        return f"argument {i}" + (f" ({what})" if what else "")

    def __call__(self, grid, block, args):
        if _capturing is not None:
            _capturing.append((self, grid, block, args))
            return
        assert len(args) == len(self.signature), f"{self.name}: {len(args)} arguments for {self.signature}"
        arrays, values = {}, []
        for i, (arg, code) in enumerate(zip(args, self.signature)):
            if code in self.POINTERS:
                assert isinstance(arg, np.ndarray), f"{self.name} {self.describe(i)}: expected an array, got {arg!r}"
                assert arg.dtype == self.POINTERS[code] and arg.flags.c_contiguous, \
                    f"{self.name} {self.describe(i)}: expected contiguous {self.POINTERS[code]}, got {arg.dtype}"
                arrays[i] = arg
                values.append(None)   # the copy's address, below
            else:
                numpy_type, c_type = self.SCALARS[code]
                assert type(arg) is numpy_type, \
                    f"{self.name} {self.describe(i)}: expected {numpy_type}, got {type(arg)}"
                values.append(c_type(arg))
        copies = guarded_copies(self.lib, arrays)
        for copy, indices in copies:
            for i in indices:
                values[i] = ctypes.c_void_p(copy.address(arrays[i].ctypes.data))
        pointers = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        assert len(block) == 1, f"{self.name}: block {block}: the emulation runs 1-D blocks only"
        try:
            status = self.lib.emu_launch_kernel(self.name.encode(), *grid, int(block[0]), pointers)
            stray = ctypes.c_ulonglong(0)
            access = self.lib.emu_stray_access(ctypes.byref(stray))
        finally:
            for copy, _ in copies:
                copy.release()
        if status != 0:
            raise EmulationError(self.lib.emu_last_error().decode() if status == -2 else f"no kernel {self.name}")
        if access:
            verb = "wrote" if access == 2 else "read"
            for copy, indices in copies:
                if copy.offset(stray.value) is not None:
                    raise EmulationError(self._outside(verb, copy, indices, arrays, [copy.offset(stray.value)]))
            raise EmulationError(f"{self.name}: AddressSanitizer saw a bad {'store' if access == 2 else 'load'} "
                                 f"at {stray.value:#x}, in no argument's guard zone (its report is on stderr)")
        for copy, _ in copies:
            copy.copy_back()
        strays = [self._outside("wrote", copy, indices, arrays, copy.bytes_written_outside())
                  for copy, indices in copies]
        strays = [s for s in strays if s]
        if strays:
            raise EmulationError("; ".join(strays))

    def _outside(self, verb, copy, indices, arrays, offsets):
        """'kernel wrote outside argument 3 (Z, float32 (7, 5)): 5 elements, at 35 .. 39 of an array of 35'
        for byte offsets from the argument's start; None for none."""
        if not len(offsets):
            return None
        itemsize = arrays[indices[0]].itemsize
        elements = np.unique(np.asarray(offsets) // itemsize)
        return (f"{self.name} {verb} outside {' = '.join(self.describe(i, arrays[i]) for i in indices)}: "
                f"{elements.size} elements, at {elements.min()} .. {elements.max()} of an array of "
                f"{copy.size // itemsize}")


_capturing = None   # the launches recorded by the stream being captured, or None
# Streams and events (upload_chunk's copy stream) run nothing asynchronously here: every op runs when it is
# issued. What they can give is the order: with stream_log a list, each record, wait, event synchronize and
# asynchronous copy is appended to it (test_cupy_kernels_emulated.py checks upload_chunk's ordering from it).
stream_log = None


def _log(*entry):
    if stream_log is not None:
        stream_log.append(entry)


class FakeEvent:
    def __init__(self, stream):
        self.stream = stream

    def synchronize(self):
        _log("synchronize", self)


class FakeStream:
    def __init__(self, name="stream"):
        self.name = name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def record(self, event=None):
        event = FakeEvent(self)
        _log("record", self, event)
        return event

    def wait_event(self, event):
        _log("wait", self, event)

    def begin_capture(self, mode=None):
        global _capturing
        assert _capturing is None, "nested capture"
        _capturing = []

    def end_capture(self):
        global _capturing
        launches, _capturing = _capturing, None
        return FakeGraph(launches)


class RecordedCopy:
    """cupy.copyto on the emulator: done at once, or, while a stream is captured, recorded as a graph node (a
    device-to-device copy is part of a captured CUDA graph, cudaMemcpyAsync, and runs at each replay)."""

    def __call__(self, grid, block, args):
        dst, src, kwargs = args
        np.copyto(dst, src, **kwargs)


def _copyto(dst, src, **kwargs):
    if _capturing is not None:
        _capturing.append((RecordedCopy(), None, None, (dst, src, kwargs)))
    else:
        np.copyto(dst, src, **kwargs)


class FakeGraph:
    def __init__(self, launches):
        self.launches = launches

    def launch(self, stream=None):
        for kernel, grid, block, args in self.launches:
            kernel(grid, block, args)


def _poisoned_empty(shape, dtype):
    """cupy.empty as the tests want it: NaN (or -7) where a kernel has not written; uint16 (bf16 bits) 0x7FFF,
    a NaN in bf16 and in fp16 alike."""
    dtype = np.dtype(dtype)
    return np.full(shape, np.nan if dtype.kind == "f" else 0x7FFF if dtype == np.uint16 else -7, dtype)


def fake_cupy():
    """The part of the cupy module CupyBackend uses, on numpy ("device" arrays are numpy arrays)."""
    return types.SimpleNamespace(
        ndarray=np.ndarray, zeros=np.zeros, full=np.full, empty=_poisoned_empty, asarray=np.asarray,
        ascontiguousarray=np.ascontiguousarray, copyto=_copyto, isfinite=np.isfinite, stack=np.stack,
        asnumpy=lambda x: np.array(x, copy=True),
        get_default_memory_pool=lambda: types.SimpleNamespace(free_bytes=lambda: 0),
        cuda=types.SimpleNamespace(
            runtime=types.SimpleNamespace(getDevice=lambda: 0, memGetInfo=lambda: (80 << 30, 80 << 30)),
            Stream=lambda non_blocking=False: FakeStream(), get_current_stream=lambda: _COMPUTE_STREAM,
            alloc_pinned_memory=bytearray,
            MemoryPool=lambda: types.SimpleNamespace(malloc=None),
            using_allocator=lambda allocator=None: contextlib.nullcontext()))


_COMPUTE_STREAM = FakeStream("compute")   # CuPy's current stream: the one every kernel launch goes to


def _copy_async(dst, host, stream):
    """cupy_backend._copy_async on numpy "device" arrays: copied now, logged as a copy on `stream`."""
    _log("copy", stream, dst, host)
    np.copyto(dst, host)


def patches(lib, sm_count):
    """(module, attribute, value) triples that put cupy_backend on the emulator, with a GPU of sm_count SMs."""
    return [(cupy_backend, "cp", fake_cupy()), (cupy_backend, "_copy_async", _copy_async),
            (cupy_backend, "_kernel", lambda filename, name: EmulatedKernel(lib, name)),
            (cupy_backend, "_sm_count", lambda: sm_count)]
