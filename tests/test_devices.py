"""Device names: one check for every command (``--device``) and entry point."""

from __future__ import annotations

import argparse

import pytest
import torch

from meswitch.devices import device_arg, resolve_device


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_the_names_meswitch_takes_pass_the_flag_check(name):
    assert device_arg(name) == name


@pytest.mark.parametrize("name", ["gpu", "GPU", "cuda:", "cuda:x", "cpu0", "", "cuda:0 "])
def test_other_names_are_refused_when_the_flags_are_parsed(name):
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", type=device_arg)
    with pytest.raises(SystemExit):
        parser.parse_args(["--device", name])
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
        resolve_device(name)


def test_auto_and_cpu_resolve_on_any_machine():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of CUDA needs a machine without it")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:0")


@pytest.mark.parametrize("native", [False, True])
def test_bf16_autocast_runs_in_bf16_on_a_cpu_only_where_it_computes_bf16_natively(monkeypatch, native):
    """Emulated bf16 on a CPU (AVX2 only) ran a matmul 20x slower than fp32: there autocast stays off. The probe is
    patched both ways (this machine has one answer); asked off, it is off everywhere."""
    from meswitch import devices

    assert isinstance(devices.cpu_has_bf16(), bool)
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: native)
    a, b = torch.randn(4, 8), torch.randn(8, 2)
    with devices.bf16_autocast(torch.device("cpu")):
        assert torch.mm(a, b).dtype == (torch.bfloat16 if native else torch.float32)
    with devices.bf16_autocast(torch.device("cpu"), enabled=False):
        assert torch.mm(a, b).dtype == torch.float32
