"""Which device and precision a fit gets, decided with a fake torch: no GPU needed to test CUDA or MPS."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sds_backend.app.device import check_device_name, describe_device, resolve_device
from sds_backend.core.guidance import resolve_dtype
from sds_backend.files import InputError


def fake_torch(cuda: bool, mps: bool, gpus: int = 1, has_mps_module: bool = True):
    backends = SimpleNamespace(mps=SimpleNamespace(is_available=lambda: mps)) if has_mps_module else SimpleNamespace()
    return SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: cuda, device_count=lambda: gpus if cuda else 0),
                           backends=backends, device=torch.device)


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"),
                                                 (False, False, "cpu")])
def test_auto_picks_cuda_then_mps_then_the_cpu(cuda, mps, expected):
    assert resolve_device("auto", fake_torch(cuda, mps)).type == expected


def test_a_torch_without_the_mps_backend_is_a_machine_without_mps():
    assert resolve_device("auto", fake_torch(False, False, has_mps_module=False)).type == "cpu"


@pytest.mark.parametrize("name, cuda, mps, message", [
    ("mps", True, False, "no Apple GPU"), ("cuda", False, True, "no CUDA GPU"), ("cuda:1", True, False, "sees 1 CUDA"),
])
def test_a_device_torch_does_not_have_is_refused_by_name(name, cuda, mps, message):
    with pytest.raises(InputError, match=message):
        resolve_device(name, fake_torch(cuda, mps))


@pytest.mark.parametrize("name", ["mps", "cuda", "cuda:0", "cpu", "auto"])
def test_device_names_are_checked_without_torch(name):
    assert check_device_name(name) == name


@pytest.mark.parametrize("name", ["MPS", "metal", "gpu", "cuda:", "mps:0"])
def test_other_device_names_are_refused(name):
    with pytest.raises(InputError, match="auto, cpu, mps or cuda"):
        check_device_name(name)


def test_precision_is_float16_on_cuda_float32_on_mps_and_the_cpu_unless_asked():
    cuda, mps, cpu = torch.device("cuda"), torch.device("mps"), torch.device("cpu")
    assert resolve_dtype("auto", cuda) == torch.float16
    assert resolve_dtype("auto", mps) == torch.float32 and resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("float16", mps) == torch.float16 and resolve_dtype("float32", cuda) == torch.float32
    with pytest.raises(ValueError, match="float16"):
        resolve_dtype("float16", cpu)


def test_the_server_says_which_device_it_runs_on():
    assert describe_device(torch.device("mps")) == "mps (Apple GPU)" and describe_device(torch.device("cpu")) == "cpu"
