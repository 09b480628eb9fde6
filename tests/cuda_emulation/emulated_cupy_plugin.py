"""pytest plugin: "cupy" is CupyBackend on the CPU emulator, so tests of the cupy backend run without a GPU:

    PYTHONPATH=tests python -m pytest -p cuda_emulation.emulated_cupy_plugin tests/test_backend_ops.py -k cupy

It patches cupy_backend at import (the registry asks cupy_backend.available() at each get_backend, so every
module sees the emulated backend). Run it in its own process only (tests/test_cupy_kernels_emulated.py does):
it leaves cupy_backend patched for good. On the emulator numpy arrays are the "device" arrays. Every launch
is checked as tests/cuda_emulation/emulator.py says (a stray store fails it with EmulationError);
GPUBP_EMULATION_SEED picks the seed of the thread and block order (default 0).
"""
import atexit
import os
import shutil
import tempfile

from cuda_emulation import emulator
from gpubp.backends import cupy_backend

SM_COUNT = int(os.environ.get("GPUBP_EMULATED_SM_COUNT", "132"))   # an H100's

_build_dir = tempfile.mkdtemp(prefix="gpubp-emulation-")
atexit.register(shutil.rmtree, _build_dir, ignore_errors=True)
_lib = emulator.build(_build_dir)
for _module, _name, _value in emulator.patches(_lib, SM_COUNT):
    setattr(_module, _name, _value)
cupy_backend.available = lambda: (True, f"cupy backend on the CPU emulator ({SM_COUNT} SMs)")
