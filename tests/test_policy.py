"""The per-layer policy: codec choice per tensor, never more bytes than dense, unbiased aggregation."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

import atomo_core
from atomo_core import LayerPolicy, WireFormatError, decode_add_, dense_nbytes, make_codec
from atomo_core.wire import CODEC_IDS


def model_gradients(seed=0):
    """Shapes of a small conv net: conv kernel, BatchNorm weight and bias, linear weight and bias."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 8, 3, 3), (16,), (16,), (10, 64), (10,)]
    return [torch.randn(shape, generator=g) for shape in shapes]


def test_matrices_use_the_codec_vectors_the_vector_codec():
    grads = model_gradients()
    policy = LayerPolicy(make_codec("svd", budget=2), vector_codec=make_codec("dense"))
    messages = policy.encode(grads, torch.Generator().manual_seed(0))
    assert [m.codec_id for m in messages] == [CODEC_IDS[c] for c in ["svd", "dense", "dense", "svd", "dense"]]
    assert all(tuple(m.shape) == tuple(t.shape) for m, t in zip(messages, grads, strict=True))


def test_layers_where_compression_does_not_pay_are_sent_dense_and_exact():
    grads = model_gradients()
    codec = make_codec("svd", budget=2)
    rates = [dense_nbytes(tuple(t.shape)) / codec.expected_nbytes(tuple(t.shape)) for t in grads[::3]]
    threshold = (rates[0] + rates[1]) / 2  # between the conv's rate and the linear layer's rate
    policy = LayerPolicy(codec, min_compression_rate=threshold)
    messages = policy.encode(grads, torch.Generator().manual_seed(0))
    low = 0 if rates[0] < rates[1] else 3
    assert messages[low].codec_id == CODEC_IDS["dense"]
    assert torch.equal(atomo_core.decode(bytes(messages[low])), grads[low])
    assert messages[3 - low].codec_id == CODEC_IDS["svd"]


def test_never_larger_than_dense_and_still_unbiased():
    """Entrywise with half of n as budget: expected size below dense, but a few samples come out larger.

    Those are sent as the dense form of the same estimate, so the bytes never exceed dense and the
    average over many steps still converges to the gradient.
    """
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, generator=g) * torch.linspace(0.1, 1, 96)
    codec = make_codec("entrywise", budget=50)
    assert codec.expected_nbytes((96,)) < dense_nbytes((96,))
    policy = LayerPolicy(codec, vector_codec=codec)
    generator = torch.Generator().manual_seed(2)
    reps = 2000
    samples = np.empty((reps, 96))
    fallbacks = 0
    for r in range(reps):
        (msg,) = policy.encode([x], generator)
        wire = bytes(msg)
        assert len(wire) <= dense_nbytes((96,))
        fallbacks += msg.codec_id == CODEC_IDS["dense"]
        samples[r] = atomo_core.decode(wire).double().numpy()
    assert 0 < fallbacks < reps  # both paths were taken
    mean, se = samples.mean(0), samples.std(0, ddof=1) / math.sqrt(reps)
    moved = se > 0
    z = np.abs(mean[moved] - x.double().numpy()[moved]) / se[moved]
    assert z.max() < stats.norm.isf(1e-3 / (2 * moved.sum()))


def test_decode_add_accumulates_every_layer():
    grads = model_gradients()
    policy = LayerPolicy(make_codec("svd", budget=2), vector_codec=make_codec("entrywise", budget=4))
    messages = policy.encode(grads, torch.Generator().manual_seed(3))
    outs = [torch.ones_like(t) for t in grads]
    decode_add_([bytes(m) for m in messages], outs, alpha=0.25)
    for out, msg in zip(outs, messages, strict=True):
        torch.testing.assert_close(out, 1 + 0.25 * atomo_core.decode(msg), rtol=1e-6, atol=1e-6)


def test_decode_add_validates_count_and_shapes_before_adding():
    grads = model_gradients()
    messages = LayerPolicy(make_codec("svd", budget=2)).encode(grads)
    outs = [torch.zeros_like(t) for t in grads]
    with pytest.raises(WireFormatError, match="5 messages for 4 tensors"):
        decode_add_(messages, outs[:4])
    swapped = outs[:3] + [torch.zeros(64, 10), outs[4]]
    with pytest.raises(WireFormatError, match="message 3 has shape"):
        decode_add_(messages, swapped)
    assert all(not bool(o.any()) for o in swapped)  # nothing was added


def test_min_compression_rate_must_be_at_least_one():
    with pytest.raises(ValueError, match="min_compression_rate"):
        LayerPolicy(make_codec("svd", budget=1), min_compression_rate=0.5)


def test_atomo_codecs_command_prints_every_codec(capsys):
    from services.cli import main

    assert main(["codecs", "--model", "lenet5", "--batch", "16", "--samples", "2"]) == 0
    out = capsys.readouterr().out
    for label in ["svd s=3", "entrywise s=64", "fourier s=64"]:
        assert label in out
    assert "dense" in out and "rel. variance" in out
    biased = [line for line in out.splitlines() if line.startswith(("topk", "powersgd"))]
    assert len(biased) == 3 and all(line.endswith("*") for line in biased)  # marked: an error, not a variance
    assert "* biased, with error feedback in the worker" in out
