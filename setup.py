"""Build of `credit_kernels._C`, the compiled extension.

    pip install --no-build-isolation -e .      # torch must already be installed

Environment switches:
    CREDIT_SKIP_EXT=1       build nothing; the package falls back to Python/Triton.
    CREDIT_FORCE_CUDA=1     compile csrc/cuda/*.cu even when torch or nvcc look unusable.
    TORCH_CUDA_ARCH_LIST    CUDA archs to build for (e.g. "9.0"); torch's default otherwise.
    MAX_JOBS                parallel compile jobs for ninja (default: number of cores).
    DEBUG=1                 -O0 -g.

C++ sources (csrc/*.cpp) are always built. CUDA sources (csrc/cuda/*.cu, csrc/cuda/*.cpp) are
added only when the installed torch is a CUDA build and nvcc is found, since a CPU torch refuses
CUDA builds.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda(torch, cuda_home) -> bool:
    if os.environ.get("CREDIT_FORCE_CUDA") == "1":
        return True
    if torch.version.cuda is None:
        return False
    return cuda_home is not None and (shutil.which("nvcc") or os.path.exists(os.path.join(cuda_home, "bin", "nvcc")))


def get_extensions():
    if os.environ.get("CREDIT_SKIP_EXT") == "1":
        print("credit: CREDIT_SKIP_EXT=1, not building credit_kernels._C", file=sys.stderr)
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    debug = os.environ.get("DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags = opt + ["-fopenmp"]  # the C++ standard is torch's (C++17 or newer, per version)
    sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    use_cuda = bool(cuda_sources) and _want_cuda(torch, CUDA_HOME)

    jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
    os.environ["MAX_JOBS"] = jobs
    print(f"credit: building credit_kernels._C ({'C++ + CUDA' if use_cuda else 'C++ only'}) with MAX_JOBS={jobs};"
          " lower MAX_JOBS if the build runs out of memory", file=sys.stderr)

    common = dict(
        name="credit_kernels._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if use_cuda:
        ext = CUDAExtension(
            sources=sources + cuda_sources,
            define_macros=[("CREDIT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": opt + ["--use_fast_math", "-lineinfo"]},
            **common,
        )
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **common)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = get_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
