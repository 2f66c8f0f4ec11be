"""Device and precision choice: 'auto' never needs a GPU, asking for a missing one is a clear
error, and VISINSPECT_PRECISION forces what precision 'auto' means."""

import pytest
import torch

from visinspect.errors import ConfigError
from visinspect.utils import cpu_has_fast_bf16, model_device, resolve_device, resolve_precision


def test_auto_device_is_cuda_only_when_pytorch_sees_a_gpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_a_missing_gpu_names_the_way_out():
    with pytest.raises(ConfigError, match=r"no CUDA GPU.*'cpu' or 'auto'"):
        resolve_device("cuda")


def test_model_device_is_where_the_parameters_live():
    assert model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")


def test_auto_precision_is_bf16_only_where_it_is_fast(monkeypatch):
    monkeypatch.delenv("VISINSPECT_PRECISION", raising=False)
    fast = torch.cuda.is_available() or cpu_has_fast_bf16()
    assert resolve_precision("auto") == ("bf16" if fast else "fp32")


@pytest.mark.parametrize(("env", "expected"), [("fp32", "fp32"), ("bf16", "bf16"), (" BF16 ", "bf16")])
def test_the_environment_forces_what_auto_means(monkeypatch, env, expected):
    monkeypatch.setenv("VISINSPECT_PRECISION", env)
    assert resolve_precision("auto") == expected
    assert resolve_precision() == expected


@pytest.mark.parametrize("env", ["fp32", "bf16"])
def test_an_explicit_precision_wins_over_the_environment(monkeypatch, env):
    monkeypatch.setenv("VISINSPECT_PRECISION", env)
    assert resolve_precision("fp32") == "fp32"
    assert resolve_precision("bf16") == "bf16"


@pytest.mark.parametrize("env", ["", "auto"])
def test_an_empty_or_auto_environment_leaves_auto_alone(monkeypatch, env):
    monkeypatch.delenv("VISINSPECT_PRECISION", raising=False)
    unset = resolve_precision("auto")
    monkeypatch.setenv("VISINSPECT_PRECISION", env)
    assert resolve_precision("auto") == unset


def test_a_bad_precision_in_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("VISINSPECT_PRECISION", "fp16")
    with pytest.raises(ConfigError, match=r"VISINSPECT_PRECISION='fp16'.*auto, fp32, bf16"):
        resolve_precision("auto")
    assert resolve_precision("fp32") == "fp32"  # not read when the caller says what it wants


def test_a_bad_precision_argument_is_refused():
    with pytest.raises(ValueError, match="'auto', 'fp32' or 'bf16'"):
        resolve_precision("half")
