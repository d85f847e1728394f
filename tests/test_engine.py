"""every_cpu_core() and environment(): what engine processes start with, and what is left behind."""

import os

from vllm_ptp.engine import RESERVED_CPU_VARIABLE, environment, every_cpu_core


def test_no_core_is_reserved_inside_and_the_environment_is_restored(monkeypatch):
    monkeypatch.delenv(RESERVED_CPU_VARIABLE, raising=False)
    with every_cpu_core():
        assert os.environ[RESERVED_CPU_VARIABLE] == "0"
    assert RESERVED_CPU_VARIABLE not in os.environ


def test_a_value_set_by_the_user_wins(monkeypatch):
    monkeypatch.setenv(RESERVED_CPU_VARIABLE, "1")
    with every_cpu_core():
        assert os.environ[RESERVED_CPU_VARIABLE] == "1"
    assert os.environ[RESERVED_CPU_VARIABLE] == "1"


def test_environment_sets_variables_inside_and_restores_them(monkeypatch):
    monkeypatch.setenv("VLLM_PTP_TEST_KEPT", "before")
    monkeypatch.delenv("VLLM_PTP_TEST_NEW", raising=False)
    with environment({"VLLM_PTP_TEST_KEPT": "inside", "VLLM_PTP_TEST_NEW": "inside"}):
        assert os.environ["VLLM_PTP_TEST_KEPT"] == os.environ["VLLM_PTP_TEST_NEW"] == "inside"
    assert os.environ["VLLM_PTP_TEST_KEPT"] == "before"
    assert "VLLM_PTP_TEST_NEW" not in os.environ
