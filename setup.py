"""Build of gradguard: the pure-Python package always, the compiled kernels when they can be.

Two compiled modules, built and failing independently, so that losing one side never drops the
other (an aarch64 host that cannot compile some CPU code still gets the CUDA kernels):
- gradguard._C (csrc/cpu): the CPU kernels, whenever torch and a C++ compiler are there.
- gradguard._C_cuda (csrc/cuda): the CUDA kernels, when the installed torch is a CUDA build and
  nvcc is found (never decided by torch.cuda.is_available(): build machines have no GPU).

Switches (booleans: 1/true/yes/on or 0/false/no/off/empty, case-insensitive; anything else is an
error naming the variable):
- GRADGUARD_BUILD_CUDA: unset = build the CUDA kernels when possible; false = never; true = their
  absence or failure is an error.
- GRADGUARD_REQUIRE_EXT: true = any kernel build failure is an error.
A failed build otherwise never fails the install: it warns, and the build step records what was
built and why not in gradguard/_build_info.json, which gradguard.backend() reports.

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
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(ROOT, "gradguard", "_build_info.json")
CPU_MODULE, CUDA_MODULE = "gradguard._C", "gradguard._C_cuda"

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def env_switch(name, default=None):
    """The boolean env switch `name`: True, False, or `default` when it is unset."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean switch: use one of 1/true/yes/on or 0/false/no/off "
                     "(or leave it empty or unset)")


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
        "machine": os.uname().machine,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def cuda_skip_reason():
    """None when the CUDA kernels can be built, else why not (an error if they are required)."""
    import torch

    build_cuda = env_switch("GRADGUARD_BUILD_CUDA")
    if build_cuda is False:
        return "disabled by GRADGUARD_BUILD_CUDA"
    if torch.version.cuda is None:
        reason = "torch is a CPU-only build"
    elif shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        reason = "nvcc not found"
    elif not glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        reason = "no CUDA sources"
    else:
        return None
    if build_cuda:
        raise RuntimeError(f"GRADGUARD_BUILD_CUDA is set but the CUDA kernels cannot be built: {reason}")
    return reason


def cuda_library_includes():
    """The include folders of torch's nvidia-* wheels that hold the cuBLAS/cuSPARSE headers
    ATen/cuda/CUDAContext.h needs: a minimal system toolkit (nvcc, cudart, CCCL) lacks them.
    CUDA 13 wheels put every library under nvidia/cu13/include, CUDA 12 ones under
    nvidia/<library>/include."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for root in list(getattr(nvidia, "__path__", [])):
        for inc in sorted(glob.glob(os.path.join(root, "*", "include"))):
            if any(os.path.exists(os.path.join(inc, h)) for h in ("cublas_v2.h", "cusparse.h")) and inc not in found:
                found.append(inc)
    return found


def module_source(name):
    """The module init (csrc/gradguard.cpp) compiled under the module's own name."""
    return [("GRADGUARD_MODULE", name.rsplit(".", 1)[1])]


# -fopenmp on both compile and link, or at::parallel_for silently runs on one thread;
# -g0 keeps the .so small and the build fast; -fno-trapping-math lets gcc if-convert the
# "finite ? x*x : 0" select in the stats loop (we never rely on FP exceptions), which is the
# difference between a scalar loop and a vectorized one (4x). No -std flag: torch's build
# helper adds the standard its own headers need (C++17 up to torch 2.13, C++20 from 2.14,
# whose ATen.h refuses anything older; nvcc accepts only one -std).
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math", "-g0"]
INCLUDE_DIRS = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "cpu")]


def cpu_extension():
    from torch.utils.cpp_extension import CppExtension

    sources = [os.path.join("csrc", "gradguard.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    macros = module_source(CPU_MODULE) + [("GRADGUARD_HOST_HELPERS", None)]
    return CppExtension(CPU_MODULE, sources, include_dirs=INCLUDE_DIRS, define_macros=macros,
                        extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=["-fopenmp"])


def cuda_extension():
    from torch.utils.cpp_extension import CUDAExtension

    sources = [os.path.join("csrc", "gradguard.cpp")] + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # +PTX: Blackwell (10.x, 12.x) and later GPUs JIT-compile the 9.0 PTX; without it they had no
    # kernel image at all. Other GPUs (Turing, 7.5) need their own entry: kernel_image.cu says so.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    # --extended-lambda: ATen/native/cuda/Loops.cuh (gpu_kernel, used by the safe math kernels)
    # has __host__ __device__ lambdas of its own.
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "--extended-lambda"]
    for inc in cuda_library_includes():
        nvcc += ["-isystem", inc]
    ext = CUDAExtension(CUDA_MODULE, sources, include_dirs=INCLUDE_DIRS + [os.path.join(ROOT, "csrc", "cuda")],
                        define_macros=module_source(CUDA_MODULE),
                        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": nvcc}, extra_link_args=["-fopenmp"])
    return ext, {"cuda_arch_list": os.environ["TORCH_CUDA_ARCH_LIST"], "cuda_includes": cuda_library_includes()}


def configure():
    """The extensions to build and the record of what was left out at configuration and why."""
    exts, info = [], {"cpu_kernels": False, "cuda_kernels": False}
    try:
        exts.append(cpu_extension())
    except Exception as exc:
        if env_switch("GRADGUARD_REQUIRE_EXT"):
            raise
        info["cpu_error"] = f"configuration failed: {type(exc).__name__}: {exc}"
    skip = cuda_skip_reason()
    if skip:
        info["cuda_skipped"] = skip
    else:
        try:
            ext, cuda_info = cuda_extension()
            exts.append(ext)
            info.update(cuda_info)
        except Exception as exc:
            if env_switch("GRADGUARD_BUILD_CUDA") or env_switch("GRADGUARD_REQUIRE_EXT"):
                raise
            info["cuda_error"] = f"configuration failed: {type(exc).__name__}: {exc}"
    return exts, info


class RecordNoTorch(build_py):
    """torch was not importable when setup.py ran: the record says so at build time."""

    reason = ""

    def run(self):
        super().run()
        info = {"error": f"torch was not importable at build time ({self.reason})", "cpu_kernels": False,
                "cuda_kernels": False, "python": sys.version.split()[0]}
        write_build_info(info, os.path.join(self.build_lib, "gradguard") if not getattr(self, "editable_mode", False) else None)


ext_modules, cmdclass = [], {}
try:
    import torch  # noqa: F401
    from torch.utils.cpp_extension import BuildExtension
except ImportError as exc:
    warnings.warn(f"gradguard: torch is not importable at build time ({exc}); installing the pure-PyTorch "
                  "package only. Install torch first and build with --no-build-isolation for the kernels.")
    RecordNoTorch.reason = str(exc)
    cmdclass = {"build_py": RecordNoTorch}
else:
    ext_modules, config_info = configure()

    class GuardedBuild(BuildExtension):
        """Builds each kernel module on its own; a failure becomes a warning and a line of the
        build record (written here, at build time), unless a switch makes it an error."""

        def run(self):
            self.info = {**base_info(), **config_info}
            package_dir = os.path.dirname(self.get_ext_fullpath(CPU_MODULE))
            try:
                super().run()
            except Exception as exc:
                # A failure before any module is built, e.g. torch's compiler ABI check when there
                # is no working compiler: every module not yet built failed with it.
                if env_switch("GRADGUARD_REQUIRE_EXT") or env_switch("GRADGUARD_BUILD_CUDA"):
                    raise
                warnings.warn(f"gradguard: building the kernels failed; every op uses the pure-PyTorch kernels "
                              f"(gradguard.backend() says why): {exc}")
                for ext in self.extensions:
                    side = "cuda" if ext.name == CUDA_MODULE else "cpu"
                    if not self.info.get(f"{side}_kernels") and not self.info.get(f"{side}_error"):
                        self.info[f"{side}_error"] = f"build failed: {type(exc).__name__}: {exc}"
            failures = [self.info.get(k) for k in ("cpu_error", "cuda_error") if self.info.get(k)]
            if failures and not (self.info["cpu_kernels"] or self.info["cuda_kernels"]):
                self.info["error"] = failures[0]
            write_build_info(self.info, package_dir)

        def copy_extensions_to_source(self):
            # `build_ext --inplace`: copy only the modules that were built; a failed one has no
            # library to copy, and its failure is already in the record.
            built = [e for e in self.extensions
                     if self.info.get(("cuda" if e.name == CUDA_MODULE else "cpu") + "_kernels")]
            every = self.extensions
            self.extensions = built
            try:
                super().copy_extensions_to_source()
            finally:
                self.extensions = every

        def build_extension(self, ext):
            side = "cuda" if ext.name == CUDA_MODULE else "cpu"
            try:
                super().build_extension(ext)
            except Exception as exc:
                required = env_switch("GRADGUARD_REQUIRE_EXT") or (side == "cuda" and env_switch("GRADGUARD_BUILD_CUDA"))
                if required:
                    raise
                warnings.warn(f"gradguard: building the {side.upper()} kernels ({ext.name}) failed; the "
                              f"{side.upper()} ops use the pure-PyTorch kernels (gradguard.backend() says why): {exc}")
                self.info[f"{side}_error"] = f"build failed: {type(exc).__name__}: {exc}"
                return
            self.info[f"{side}_kernels"] = True

    cmdclass = {"build_ext": GuardedBuild.with_options(use_ninja=True)}

setup(
    name="gradguard",
    version="0.1.0",
    description="One-pass NaN/Inf checks, gradient norms, safe math and a guarded optimizer for PyTorch",
    packages=find_packages(include=["gradguard", "gradguard.*"]),
    package_data={"gradguard": ["_build_info.json"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.6"],
    extras_require={"demo": ["matplotlib>=3.5"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
