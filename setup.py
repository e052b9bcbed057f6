"""Builds flash_mha._C: the C++ CPU kernels always, the CUDA kernels when a CUDA toolkit and a
CUDA build of torch are present (arch list from TORCH_CUDA_ARCH_LIST, default "8.0;9.0a")."""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def rel(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


cpp_sources = rel("csrc/ops.cpp") + rel("csrc/cpu/*.cpp")
cuda_sources = rel("csrc/cuda/*.cu")
# at::parallel_for is a header template that runs `#pragma omp parallel` when torch's parallel
# backend is OpenMP: without -fopenmp here it silently runs on one thread.
openmp = (torch.__config__.parallel_info().find("parallel backend: OpenMP") >= 0
          and os.environ.get("FLASH_MHA_OPENMP", "1") != "0")
cxx_flags = ["-O3", "-std=c++20"] + (["-fopenmp"] if openmp else [])
link_flags = ["-fopenmp"] if openmp else []
use_cuda = (
    torch.version.cuda is not None
    and CUDA_HOME is not None
    and bool(cuda_sources)
    and os.environ.get("FLASH_MHA_CPU_ONLY", "0") != "1"
)

if use_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    print(f"flash_mha: building CPU + CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    ext = CUDAExtension(
        "flash_mha._C",
        cpp_sources + cuda_sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=[("FLASH_MHA_WITH_CUDA", None)],
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "-Xptxas=-warn-spills"],
        },
        extra_link_args=link_flags,
        py_limited_api=False,
    )
else:
    why = "torch has no CUDA" if torch.version.cuda is None else "no CUDA toolkit found (CUDA_HOME)"
    if os.environ.get("FLASH_MHA_CPU_ONLY", "0") == "1":
        why = "FLASH_MHA_CPU_ONLY=1"
    print(f"flash_mha: CPU-only build ({why}); CUDA kernels are not compiled")
    ext = CppExtension(
        "flash_mha._C",
        cpp_sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
