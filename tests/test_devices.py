"""Device resolution: "auto", named devices that must exist here, and the message that lists the
available ones (CUDA is faked where the test needs it, so these run on any machine)."""

from __future__ import annotations

import pytest
import torch

from pmetlab.devices import available_devices, resolve_device, worker_device


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_cuda_names_what_is_available(no_cuda, name):
    with pytest.raises(ValueError) as info:
        resolve_device(name)
    msg = str(info.value)
    assert f"device {name!r} is not available" in msg and "available here: cpu" in msg and "'auto'" in msg
    build = "has no CUDA support" if torch.version.cuda is None else "this machine has 0 cuda device(s)"
    assert build in msg


def test_a_missing_gpu_index_lists_the_gpus(two_gpus):
    assert available_devices()[:3] == ["cpu", "cuda:0", "cuda:1"]
    assert resolve_device("cuda:1") == torch.device("cuda:1") and resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(ValueError, match=r"'cuda:2' is not available: this machine has 2 cuda device\(s\); .*cuda:1"):
        resolve_device("cuda:2")


def test_a_launcher_rank_without_its_gpu_is_refused(two_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert worker_device("cuda") == torch.device("cuda:1")
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(ValueError, match=r"'cuda:3 \(LOCAL_RANK=3\)' is not available"):
        worker_device("cuda")


def test_mps_when_absent(monkeypatch, no_cuda):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'mps' is not available: .*available here: cpu"):
        resolve_device("mps")


def test_cpu_auto_and_unchecked_types_pass(no_cuda):
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("meta") == torch.device("meta")  # not an accelerator of this machine: not checked
    with pytest.raises(ValueError, match=r"'bogus' is not a valid torch device; .*\(available here: cpu\)"):
        resolve_device("bogus")


def test_load_model_refuses_an_unavailable_device_before_loading(no_cuda, monkeypatch):
    import pmetlab.models.loading as loading

    def never(*a, **k):
        raise AssertionError("the model was loaded although the device is unavailable")

    monkeypatch.setattr(loading, "_load_causal_lm", never)
    with pytest.raises(ValueError, match="device 'cuda' is not available"):
        loading.load_model("smollm2-135m", device="cuda")
