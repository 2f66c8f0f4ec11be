"""Device choice: 'auto' never needs a GPU, and asking for a missing one is a clear error."""

import pytest
import torch

from visinspect.errors import ConfigError
from visinspect.utils import model_device, resolve_device


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
