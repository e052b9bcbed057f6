"""Builds flash_mha._C: the C++ CPU kernels always, the CUDA kernels when a CUDA toolkit and a
CUDA build of torch are present (arch list from TORCH_CUDA_ARCH_LIST, default "8.0;9.0a")."""
import glob
import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))


def has_cuda_headers(home):
    return home is not None and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h"))


# Without CUDA_HOME / CUDA_PATH, torch takes the toolkit root from `which nvcc`. An nvcc on the PATH
# that is a wrapper script or a link (e.g. /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc)
# gives a root without the CUDA headers, and the build fails late on cuda_runtime_api.h: take the
# link's target, or /usr/local/cuda, when that is where the headers are.
nvcc = shutil.which("nvcc")
if nvcc and not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
    if not has_cuda_headers(os.path.dirname(os.path.dirname(nvcc))):
        for home in (os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"):
            if has_cuda_headers(home):
                os.environ["CUDA_HOME"] = home
                break

from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402
import torch  # noqa: E402


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

if use_cuda and not has_cuda_headers(CUDA_HOME):
    raise SystemExit(f"flash_mha: the CUDA toolkit root {CUDA_HOME!r} has no include/cuda_runtime_api.h; set "
                     "CUDA_HOME to the toolkit's root (e.g. /usr/local/cuda), or FLASH_MHA_CPU_ONLY=1 for a CPU build")

# ATen's CUDA headers (included by ops.cpp only) include cuSPARSE's and cuBLAS's, which a minimal
# toolkit (nvcc and the runtime) lacks; torch's CUDA wheels bring them (site-packages/nvidia/...).
# -isystem: searched after the toolkit's own include directory, so only the missing headers come
# from there.
cuda_cxx_flags = []
if use_cuda and not os.path.exists(os.path.join(CUDA_HOME, "include", "cusparse.h")):
    site = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    found = sorted(glob.glob(os.path.join(site, "nvidia", "*", "include", "cusparse.h")))
    if found:
        cuda_cxx_flags = ["-isystem", os.path.dirname(found[0])]

if use_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    print(f"flash_mha: building CPU + CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    ext = CUDAExtension(
        "flash_mha._C",
        cpp_sources + cuda_sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=[("FLASH_MHA_WITH_CUDA", None)],
        extra_compile_args={
            "cxx": cxx_flags + cuda_cxx_flags,
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
