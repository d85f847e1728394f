"""every_cpu_core(): the environment it gives engine processes, and what it leaves behind."""

import os

from vllm_ptp.engine import RESERVED_CPU_VARIABLE, every_cpu_core


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
