"""Build fastrl and its compiled extension fastrl._C.

    pip install --no-build-isolation -e .        # uses the torch already installed

The CPU kernels are always built. The CUDA kernels are built when torch has CUDA and nvcc is found;
FASTRL_CUDA=0 turns them off, FASTRL_CUDA=1 makes their absence an error. The GPU architectures
come from TORCH_CUDA_ARCH_LIST (torch's default when unset). MAX_JOBS bounds parallel compiles.
"""
import glob
import os
import sys

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    flag = os.environ.get("FASTRL_CUDA", "").strip()
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "0":
        return False
    if flag == "1":
        if not available:
            raise RuntimeError(
                "FASTRL_CUDA=1 but the CUDA kernels cannot be built here: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}. "
                "Install a CUDA build of torch and the CUDA toolkit (nvcc), or set FASTRL_CUDA=0."
            )
        return True
    return available


def rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extension():
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    sources = rel("csrc/cpu/*.cpp") + rel("csrc/torch/*.cpp")
    # -ffp-contract=off: no FMA contraction, so the CPU rounds exactly as the CUDA kernels (common.h).
    cxx = ["-O3", "-std=c++17", "-fvisibility=hidden", "-ffp-contract=off"]
    link = []
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        # at::parallel_for is an inline `#pragma omp parallel` (ATen/ParallelOpenMP.h): without
        # -fopenmp every CPU kernel silently runs on one thread. libgomp.so.1 is the one torch
        # already loaded (same soname), so there is one OpenMP runtime in the process.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if want_cuda():
        nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
        return CUDAExtension(
            "fastrl._C",
            sources + rel("csrc/cuda/*.cu"),
            include_dirs=include_dirs,
            define_macros=[("FASTRL_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    return CppExtension("fastrl._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
                        extra_link_args=link)


setup(
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
