import pytest
import torch

import atomo_core
from atomo_core.wire import WireFormatError


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dense_round_trip_is_exact(dtype):
    x = torch.randn(3, 4, 5).to(dtype)
    msg = atomo_core.make_codec("dense").encode(x)
    wire = bytes(msg)
    assert len(wire) == len(msg)
    y = atomo_core.decode(wire)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, x.float().to(dtype))


def test_truncated_message_names_the_problem():
    wire = bytes(atomo_core.make_codec("dense").encode(torch.randn(10)))
    with pytest.raises(WireFormatError, match="bytes but its header describes"):
        atomo_core.decode(wire[:-1])
