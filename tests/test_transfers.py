"""engine.transfers: outputs reach the host as arrays the caller owns, with one sync on CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.transfers import Transfers


def test_cpu_outputs_are_arrays_and_none_stays_none() -> None:
    transfers = Transfers(torch.device("cpu"))
    a = torch.arange(6.0).reshape(2, 3)
    out = transfers.to_host([a, None])
    assert out[1] is None
    np.testing.assert_array_equal(out[0], a.numpy())
    assert transfers.to_device(a) is a


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_results_survive_the_next_call() -> None:
    transfers = Transfers(torch.device("cuda"))
    first = transfers.to_host([transfers.to_device(torch.ones(2, 3)), None])
    second = transfers.to_host([transfers.to_device(torch.zeros(2, 3)), None])
    np.testing.assert_array_equal(first[0], np.ones((2, 3), np.float32))
    np.testing.assert_array_equal(second[0], np.zeros((2, 3), np.float32))
    assert second[1] is None
