"""The kernel sources load however gpubp is run: from a plain checkout with PYTHONPATH (the GPU machine, where
nothing can be installed), from an editable install and from an installed wheel (kernels/ shipped as the
package data gpubp.kernels). Each case runs in a fresh interpreter on a copy of the tree and checks where the
sources came from, so a lookup that silently read another copy cannot pass."""
import os
import pathlib
import shutil
import subprocess
import sys

from gpubp.backends import cuda_sources

ROOT = pathlib.Path(__file__).resolve().parents[1]

_PROBE = (
    "from gpubp.backends import cuda_sources\n"
    "for f in cuda_sources.KERNEL_FILES:\n"
    "    source, options, names = cuda_sources.module_source(f)\n"
    "    assert not cuda_sources._INCLUDE.search(source), f\n"
    "print(pathlib.Path(str(cuda_sources.kernels_dir())).resolve())\n"
)


def _where_sources_load(pythonpath, cwd):
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    result = subprocess.run([sys.executable, "-c", "import pathlib\n" + _PROBE], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return pathlib.Path(result.stdout.strip())


def _copy_tree(dst):
    for part in ("gpubp", "kernels"):
        shutil.copytree(ROOT / part, dst / part, ignore=shutil.ignore_patterns("__pycache__"))


def test_plain_checkout_with_pythonpath_loads_its_own_kernels(tmp_path):
    checkout = tmp_path / "checkout"
    _copy_tree(checkout)
    assert _where_sources_load(checkout, cwd=tmp_path) == (checkout / "kernels").resolve()


def test_wheel_layout_loads_the_package_data(tmp_path):
    # What a wheel installs: gpubp/ with the kernels inside it as gpubp/kernels, no top-level kernels/.
    site = tmp_path / "site-packages"
    shutil.copytree(ROOT / "gpubp", site / "gpubp", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "kernels", site / "gpubp" / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    assert _where_sources_load(site, cwd=tmp_path) == (site / "gpubp" / "kernels").resolve()


def test_this_interpreter_reads_this_checkout():
    # The test process itself (an editable install, or PYTHONPATH) reads the tree these tests sit in.
    assert pathlib.Path(str(cuda_sources.kernels_dir())).resolve() == (ROOT / "kernels").resolve()
    assert cuda_sources.read_kernel_file("gemm.cuh") == (ROOT / "kernels" / "gemm.cuh").read_text(encoding="utf-8")
