from __future__ import annotations

import logging

import pytest
import torch

from stoic_ct.errors import InputError, StoicError
from stoic_ct.parallel import on_devices, training_devices

CPU = torch.device("cpu")


def test_devices_are_read_from_a_comma_list() -> None:
    assert training_devices("cpu, cpu") == [CPU, CPU]
    if not torch.cuda.is_available():
        assert training_devices("auto") == [CPU]
    with pytest.raises(StoicError, match="cuda:99 was asked for, but PyTorch sees"):
        training_devices("cuda:99")
    with pytest.raises(StoicError, match="'gpu' is not a device"):
        training_devices("gpu")


def fail_on_the_second(device: torch.device, job: int) -> int:
    if job == 2:
        raise InputError("cannot be read", "/data/scan-2.mha")
    return job * 10


def test_jobs_run_in_processes_and_their_errors_keep_the_file() -> None:
    assert on_devices(fail_on_the_second, [(CPU, 1), (CPU, 3)]) == [10, 30]
    with pytest.raises(InputError) as error:
        on_devices(fail_on_the_second, [(CPU, 1), (CPU, 2)])
    assert str(error.value) == "/data/scan-2.mha: cannot be read"


def log_the_job(device: torch.device, job: int) -> int:
    logging.getLogger("stoic_ct.test").info("job %d on %s", job, device)
    return job


def test_jobs_in_child_processes_log_as_the_entry_points_do(
    capfd: pytest.CaptureFixture[str],
) -> None:
    assert on_devices(log_the_job, [(CPU, 1), (CPU, 2)]) == [1, 2]
    out = capfd.readouterr().out
    assert "job 1 on cpu" in out and "job 2 on cpu" in out
