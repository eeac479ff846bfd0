"""Build of gradguard: the pure-Python package always, the compiled kernels when they can be.

- CPU kernels (csrc/cpu) are built whenever torch and a C++ compiler are there.
- CUDA kernels (csrc/cuda) are added when the installed torch is a CUDA build and nvcc is found
  (never decided by torch.cuda.is_available(): build machines have no GPU).
  GRADGUARD_BUILD_CUDA=0 turns them off, =1 makes their absence an error.
- A failed build never fails the install: it warns, and records the reason in
  gradguard/_build_info.json, which gradguard.backend() reports.

Build without isolation (`pip install --no-build-isolation .`): the kernels must be compiled
against the torch that will import them.
"""
import glob
import json
import os
import shutil
import sys
import time
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(ROOT, "gradguard", "_build_info.json")


def flag(name: str) -> bool:
    """The env switches are on for any value but empty and "0" (as gradguard/_extension.py reads them)."""
    return os.environ.get(name, "") not in ("", "0")


def write_build_info(info, package_dir=None):
    """Writes the record next to the package's sources and, for a wheel or a non-editable
    install, next to the built extension (the build folder the wheel is packed from)."""
    targets = {BUILD_INFO}
    if package_dir:
        targets.add(os.path.join(package_dir, "_build_info.json"))
    for path in targets:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(info, f, indent=1, sort_keys=True)


def base_info():
    import torch

    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def cuda_wanted():
    import torch

    flag = os.environ.get("GRADGUARD_BUILD_CUDA", "auto")
    if flag == "0":
        return False, "disabled by GRADGUARD_BUILD_CUDA=0"
    if torch.version.cuda is None:
        reason = "torch is a CPU-only build"
    elif shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        reason = "nvcc not found"
    elif not glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        reason = "no CUDA sources"
    else:
        return True, None
    if flag == "1":
        raise RuntimeError(f"GRADGUARD_BUILD_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    return False, reason


def extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = [os.path.join("csrc", "gradguard.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -fopenmp on both compile and link, or at::parallel_for silently runs on one thread;
    # -g0 keeps the .so small and the build fast; -fno-trapping-math lets gcc if-convert the
    # "finite ? x*x : 0" select in the stats loop (we never rely on FP exceptions), which is the
    # difference between a scalar loop and a vectorized one (4x). No -std flag: torch's build
    # helper adds the standard its own headers need (C++17 up to torch 2.13, C++20 from 2.14,
    # whose ATen.h refuses anything older; nvcc accepts only one -std).
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-g0"]
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "cpu")]
    want_cuda, why_not = cuda_wanted()
    if not want_cuda:
        ext = CppExtension("gradguard._C", sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
        return [ext], {"cuda_kernels": False, "cuda_skipped": why_not}
    import torch

    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # torch's nvidia wheels ship the cuBLAS/cuSPARSE headers that ATen/cuda/CUDAContext.h needs
    # when the system toolkit is a minimal one.
    # --extended-lambda: ATen/native/cuda/Loops.cuh (gpu_kernel, used by the safe math kernels)
    # has __host__ __device__ lambdas of its own.
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "--extended-lambda"]
    for site in sys.path:
        inc = os.path.join(site, "nvidia", "cu13", "include")
        if os.path.isdir(inc):
            nvcc += ["-isystem", inc]
            break
    ext = CUDAExtension("gradguard._C", sources, include_dirs=include_dirs + [os.path.join(ROOT, "csrc", "cuda")],
                        extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])
    return [ext], {"cuda_kernels": True, "cuda_arch_list": os.environ["TORCH_CUDA_ARCH_LIST"],
                   "torch_cuda": torch.version.cuda}


ext_modules, cmdclass = [], {}
try:
    import torch  # noqa: F401
    from torch.utils.cpp_extension import BuildExtension
except ImportError as exc:
    warnings.warn(f"gradguard: torch is not importable at build time ({exc}); installing the pure-PyTorch "
                  "package only. Install torch first and build with --no-build-isolation for the kernels.")
    if os.path.exists(BUILD_INFO):
        os.remove(BUILD_INFO)
else:
    try:
        ext_modules, _ext_info = extensions()
    except Exception as exc:  # configuration error: fall back, but say why
        if os.environ.get("GRADGUARD_BUILD_CUDA") == "1" or flag("GRADGUARD_REQUIRE_EXT"):
            raise
        ext_modules, _ext_info = [], {}
        warnings.warn(f"gradguard: not building the extension: {exc}")
        write_build_info({**base_info(), "error": f"configuration failed: {exc}"})

    class GuardedBuild(BuildExtension):
        """Builds the kernels; a compiler failure becomes a warning and a build record."""

        def run(self):
            package_dir = os.path.dirname(self.get_ext_fullpath("gradguard._C"))
            try:
                super().run()
            except Exception as exc:
                if os.environ.get("GRADGUARD_BUILD_CUDA") == "1" or flag("GRADGUARD_REQUIRE_EXT"):
                    raise
                warnings.warn(f"gradguard: building the compiled kernels failed; installing the pure-PyTorch "
                              f"package (gradguard.backend() will say why): {exc}")
                write_build_info({**base_info(), "error": f"build failed: {type(exc).__name__}: {exc}"}, package_dir)
                return
            write_build_info({**base_info(), **_ext_info}, package_dir)

    cmdclass = {"build_ext": GuardedBuild.with_options(use_ninja=True)}

setup(
    name="gradguard",
    version="0.1.0",
    description="One-pass NaN/Inf checks, gradient norms, safe math and a guarded optimizer for PyTorch",
    packages=find_packages(include=["gradguard", "gradguard.*"]),
    package_data={"gradguard": ["_build_info.json"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
