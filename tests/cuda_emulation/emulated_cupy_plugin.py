"""pytest plugin: "cupy" is CupyBackend on the CPU emulator, so the shared op harness runs on it without a GPU:

    PYTHONPATH=tests python -m pytest -p cuda_emulation.emulated_cupy_plugin tests/test_backend_ops.py -k cupy

It patches at import, before conftest and the test modules import gpubp.backends' functions by name:
get_backend("cupy") returns the emulated backend and availability() reports it usable. Run it in its own
process only (tests/test_cupy_kernels_emulated.py does): it leaves cupy_backend patched for good.
"""
import os
import tempfile

import gpubp.backends
from cuda_emulation import emulator

SM_COUNT = int(os.environ.get("GPUBP_EMULATED_SM_COUNT", "132"))   # an H100's

_lib = emulator.build(tempfile.mkdtemp(prefix="gpubp-emulation-"))
for _module, _name, _value in emulator.patches(_lib, SM_COUNT):
    setattr(_module, _name, _value)

_real_get_backend = gpubp.backends.get_backend
_real_availability = gpubp.backends.availability


def get_backend(name="auto", deterministic=False):
    if name == "cupy":
        return gpubp.backends.cupy_backend.CupyBackend(deterministic)
    return _real_get_backend(name, deterministic)


def availability():
    result = _real_availability()
    result["cupy"] = (True, f"cupy backend on the CPU emulator ({SM_COUNT} SMs)")
    return result


gpubp.backends.get_backend = get_backend
gpubp.backends.availability = availability
