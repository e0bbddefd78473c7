"""The BIASED baselines with error feedback, topk and powersgd: the feedback arithmetic, each compressor's
defining property, their wire form and its validation, the policy's per-layer memory, a statistical
demonstration of the bias, and a short training run over a real PS."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

import atomo_core
from atomo_core import Feedback, LayerPolicy, Message, WireFormatError, WireLimits, dense_nbytes, make_codec
from atomo_core.biased import TopKCodec
from atomo_core.models import build_model
from atomo_core.wire import CODEC_IDS
from services.common.spec import CodecSpec

BIASED = [("topk", {"budget": 7}), ("powersgd", {"rank": 2})]
SHAPES = [(6, 2, 3, 3), (10, 24), (40,)]


def gradient(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.linspace(0.2, 2, shape[-1])


def message(name, params, tensor, seed=0):
    return make_codec(name, **params).encode(tensor, torch.Generator().manual_seed(seed))


def with_sections(msg: Message, sections) -> bytes:
    return bytes(Message(msg.codec_id, msg.shape, msg.dtype, msg.params, sections))


# -- error feedback -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,params", BIASED)
@pytest.mark.parametrize("shape", SHAPES)
def test_sent_plus_residual_is_everything_computed(name, params, shape):
    """EF-SGD's invariant: sum_t Delta_t + e_T = sum_t g_t, with Delta_t decoded from the bytes alone."""
    codec = make_codec(name, **params)
    generator = torch.Generator().manual_seed(1)
    feedback, sent, computed = None, torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    for step in range(8):
        g = gradient(shape, 10 + step)
        msg, feedback = codec.encode_with_feedback(g, feedback, generator)
        sent += atomo_core.decode(bytes(msg)).double()
        computed += g.double()
    assert feedback.residual.shape == shape and feedback.residual.dtype == torch.float32
    exact = name == "powersgd" and len(shape) == 1  # a vector is one row: rank 1 holds it exactly
    assert bool(feedback.residual.any()) != exact  # otherwise something is carried over: the codec compresses
    torch.testing.assert_close(sent + feedback.residual.double(), computed, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,params", BIASED)
def test_encode_is_one_step_from_zero_memory_and_leaves_feedback_untouched(name, params):
    codec = make_codec(name, **params)
    g = gradient((10, 24), 0)
    plain = codec.encode(g, torch.Generator().manual_seed(3))
    first, state = codec.encode_with_feedback(g, None, torch.Generator().manual_seed(3))
    assert bytes(plain) == bytes(first)
    again, _ = codec.encode_with_feedback(g, codec.new_feedback(g), torch.Generator().manual_seed(3))
    assert bytes(again) == bytes(first)
    residual = state.residual.clone()
    codec.encode_with_feedback(gradient((10, 24), 1), state)
    assert torch.equal(state.residual, residual)


def test_feedback_of_another_shape_is_refused():
    codec = make_codec("topk", budget=3)
    _, state = codec.encode_with_feedback(gradient((10, 24), 0), None)
    with pytest.raises(ValueError, match=r"topk: the residual has shape \(10, 24\), the tensor \(24, 10\)"):
        codec.encode_with_feedback(gradient((24, 10), 0), state)


@pytest.mark.parametrize("name,params", BIASED)
def test_non_finite_gradients_are_refused(name, params):
    g = gradient((10, 24), 0)
    g[3, 4] = math.nan
    with pytest.raises(ValueError, match=f"{name}: the gradient plus residual has non-finite entries"):
        make_codec(name, **params).encode(g)


# -- topk ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,k", [((10, 24), 17), ((6, 2, 3, 3), 1), ((40,), 40), ((5, 3), 100)])
def test_topk_keeps_exactly_the_k_largest_magnitudes(shape, k):
    x = gradient(shape, 2)
    estimate = atomo_core.decode(bytes(make_codec("topk", budget=k).encode(x)))
    kept = estimate.reshape(-1) != 0
    assert int(kept.sum()) == min(k, x.numel())
    assert torch.equal(estimate.reshape(-1)[kept], x.reshape(-1)[kept])
    if k < x.numel():  # every kept magnitude is at least every dropped one
        assert x.reshape(-1)[kept].abs().min() >= x.reshape(-1)[~kept].abs().max()


def test_topk_budget_must_be_a_whole_number():
    for budget in (0, 2.5, math.inf, True, "3"):
        with pytest.raises(ValueError, match="topk: budget"):
            make_codec("topk", budget=budget)
    assert make_codec("topk", budget=5.0).budget == 5


# -- powersgd -----------------------------------------------------------------------------------------------


def low_rank(n, m, r, seed, noise=0.0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -0.6, r)
    x = (torch.randn(n, r, generator=g) * scales) @ torch.randn(r, m, generator=g)
    return x + noise * torch.randn(n, m, generator=g)


def factors(msg):
    n, m = msg.shape[0], math.prod(msg.shape[1:])
    p, q = msg.sections
    return p.reshape(n, -1), q.reshape(m, -1)


def warm_started(codec, x, steps, seed=0):
    """`steps` encodings of the same matrix, each warm-started from the previous Q, without a residual."""
    generator = torch.Generator().manual_seed(seed)
    msg, state = codec.encode_with_feedback(x, None, generator)
    messages = [msg]
    for _ in range(steps - 1):
        msg, state = codec.encode_with_feedback(x, Feedback(torch.zeros_like(x), state.warm_start), generator)
        messages.append(msg)
    return messages


def relative_error(msg, x):
    return float((atomo_core.decode(bytes(msg)) - x).norm() / x.norm())


def test_powersgd_is_exact_for_a_matrix_of_its_rank():
    x = low_rank(30, 50, 3, seed=0)
    for msg in warm_started(make_codec("powersgd", rank=3), x, 3):
        assert relative_error(msg, x) < 1e-5


def test_powersgd_p_is_orthonormal():
    codec = make_codec("powersgd", rank=4)
    for msg in warm_started(codec, low_rank(40, 60, 8, seed=1, noise=0.1), 3):
        p, q = factors(msg)
        assert p.shape == (40, 4) and q.shape == (60, 4)
        torch.testing.assert_close(p.T @ p, torch.eye(4), rtol=0, atol=1e-5)


def test_powersgd_warm_start_converges_to_the_best_rank_r_approximation():
    """Each warm-started step is one more subspace iteration: the error falls step by step toward the
    Eckart-Young bound ||X - X_r|| (the singular values past r)."""
    x = low_rank(40, 60, 8, seed=2, noise=0.05)
    errors = [relative_error(msg, x) for msg in warm_started(make_codec("powersgd", rank=2), x, 12)]
    sigma = torch.linalg.svdvals(x.double())
    best = float(sigma[2:].norm() / sigma.norm())
    assert errors[0] > 1.1 * best  # a random start is not the best subspace
    assert errors[1] < errors[0] and errors[3] < errors[1]  # the warm start changes the result step to step
    assert errors[-1] < 1.01 * best
    assert errors[-1] >= best * (1 - 1e-6)


def test_powersgd_is_reproducible_from_the_generator_seed():
    x = gradient((16, 2, 3, 3), 4)
    codec = make_codec("powersgd", rank=2)
    assert bytes(codec.encode(x, torch.Generator().manual_seed(5))) == bytes(
        codec.encode(x, torch.Generator().manual_seed(5))
    )
    assert bytes(codec.encode(x, torch.Generator().manual_seed(5))) != bytes(
        codec.encode(x, torch.Generator().manual_seed(6))
    )


def test_powersgd_rank_is_capped_by_the_matrix():
    x = gradient((3, 10), 0)
    msg = make_codec("powersgd", rank=8).encode(x)
    p, q = factors(msg)
    assert p.shape == (3, 3) and q.shape == (10, 3)
    assert relative_error(msg, x) < 1e-5  # rank min(n, m): exact
    for rank in (0, 1.5, 1025, math.nan):
        with pytest.raises(ValueError, match="powersgd: rank"):
            make_codec("powersgd", rank=rank)


# -- the wire -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,params", BIASED)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_from_the_bytes_alone_with_the_expected_size(name, params, shape):
    codec = make_codec(name, **params)
    x = gradient(shape, 5)
    msg = codec.encode(x, torch.Generator().manual_seed(0))
    wire = bytes(msg)
    assert len(wire) == codec.expected_nbytes(shape)
    assert torch.equal(atomo_core.decode(wire), codec.decode_message(msg))
    assert atomo_core.codec_for(atomo_core.wire.decode_message(wire)).wire_params() == codec.wire_params()
    for dtype in (torch.float16, torch.float64):
        estimate = atomo_core.decode(bytes(codec.encode(x.to(dtype), torch.Generator().manual_seed(0))))
        assert estimate.dtype == dtype and estimate.shape == shape


@pytest.mark.parametrize("name,params", BIASED)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_add_equals_decode_plus_add(name, params, shape, dtype):
    """The aggregation without a dense estimate (topk: index_add_ of the values; powersgd: one addmm_ of the
    factors, on out's device) adds what decode returns: exactly for topk, to float rounding for powersgd."""
    wire = bytes(message(name, params, gradient(shape, 3).to(dtype)))
    start = gradient(shape, 4).to(dtype)
    estimate = atomo_core.decode(wire)
    codec = atomo_core.codec_for(atomo_core.wire.decode_message(wire))
    for alpha in (1.0, -0.25, 0.3):
        expected = start.clone().add_(estimate.to(dtype), alpha=alpha)
        out = start.clone()
        assert codec.decode_add_(wire, out, alpha) is out
        if name == "topk" and alpha != 0.3:  # alpha * value is exact: the same sums bit for bit
            assert torch.equal(out, expected)
        torch.testing.assert_close(out, expected)
    if len(shape) == 2:  # a non-contiguous output takes the generic path
        out = start.T.contiguous().T
        codec.decode_add_(wire, out, 0.5)
        torch.testing.assert_close(out, start + 0.5 * estimate)


def test_decode_add_validates_like_decode_and_adds_nothing_to_a_bad_message():
    topk = message("topk", {"budget": 5}, gradient((10, 24), 0))
    index, values = topk.sections
    powersgd = message("powersgd", {"rank": 2}, gradient((10, 24), 0))
    p, q = powersgd.sections
    bad = [
        with_sections(topk, [index.clone().index_fill_(0, torch.tensor([4]), 240), values]),
        with_sections(topk, [index.flip(0).contiguous(), values]),
        with_sections(topk, [index, values.clone().index_fill_(0, torch.tensor([2]), math.inf)]),
        with_sections(topk, [index[:4].contiguous(), values[:4].contiguous()]),
        with_sections(powersgd, [p[:-1].contiguous(), q]),
        with_sections(powersgd, [p, q.clone().index_fill_(0, torch.tensor([0]), math.nan)]),
    ]
    for wire in bad:
        with pytest.raises(WireFormatError) as decoded:
            atomo_core.decode(wire)
        codec = atomo_core.codec_for(atomo_core.wire.decode_message(wire))
        out = torch.ones(10, 24)
        with pytest.raises(WireFormatError, match=re.escape(str(decoded.value))):
            codec.decode_add_(wire, out)
        assert torch.equal(out, torch.ones(10, 24))
    for name, msg in (("topk", topk), ("powersgd", powersgd)):
        codec = atomo_core.codec_for(msg)
        with pytest.raises(WireFormatError, match=r"message shape \(10, 24\) does not match \(24, 10\)"):
            codec.decode_add_(bytes(msg), torch.zeros(24, 10))
        other = powersgd if name == "topk" else topk
        with pytest.raises(WireFormatError, match="codec id"):
            codec.decode_add_(bytes(other), torch.zeros(10, 24))


def test_bytes_formulas():
    """topk: 8 bytes per kept entry; powersgd: 4 r (n + m) bytes; plus the header, sections padded to 8."""

    def header(shape):
        return len(Message(0, shape, torch.float32, (1.0,), [torch.empty(0)] * 2))

    assert make_codec("topk", budget=300).expected_nbytes((64, 100)) == header((64, 100)) + 8 * 300
    shape = (64, 10, 3, 3)
    assert make_codec("powersgd", rank=4).expected_nbytes(shape) == header(shape) + 4 * 4 * (64 + 90)


@pytest.mark.parametrize("name,params", BIASED)
def test_every_truncation_and_extension_is_rejected(name, params):
    wire = bytes(message(name, params, gradient((6, 2, 3, 3), 0)))
    for end in range(len(wire)):
        with pytest.raises(WireFormatError):
            atomo_core.decode(wire[:end])
    with pytest.raises(WireFormatError):
        atomo_core.decode(wire + bytes(8))


def test_topk_indices_must_be_in_range_strictly_increasing_and_match_the_budget():
    msg = message("topk", {"budget": 5}, gradient((10, 24), 0))
    index, values = msg.sections
    bad = [
        (index.clone().index_fill_(0, torch.tensor([4]), 240), r"indices must lie in \[0, 240\)"),  # out of range
        (index.clone().index_fill_(0, torch.tensor([0]), -1), r"indices must lie in \[0, 240\)"),  # negative
        (index.flip(0).contiguous(), "strictly increasing"),  # unsorted
        (index.clone().index_fill_(0, torch.tensor([1]), int(index[0])), "strictly increasing"),  # duplicate
    ]
    for indices, error in bad:
        with pytest.raises(WireFormatError, match=error):
            atomo_core.decode(with_sections(msg, [indices, values]))
    sizes = [
        [index[:4].contiguous(), values[:4].contiguous()],  # one entry short of the budget
        [index, torch.cat([values, values[:1]])],  # one value more than indices
        [index.long(), values],  # int64 indices
        [index],  # one section
    ]
    for sections in sizes:
        with pytest.raises(WireFormatError, match="topk"):
            atomo_core.decode(with_sections(msg, sections))
    with pytest.raises(WireFormatError, match="topk: values contain non-finite"):
        atomo_core.decode(with_sections(msg, [index, values.clone().index_fill_(0, torch.tensor([2]), math.inf)]))


def test_powersgd_factors_must_match_the_rank_and_shape():
    msg = message("powersgd", {"rank": 2}, gradient((10, 24), 0))
    p, q = msg.sections
    for sections in ([p[:-1].contiguous(), q], [p, torch.cat([q, q[:24]])], [p.double(), q], [p]):
        with pytest.raises(WireFormatError, match="powersgd"):
            atomo_core.decode(with_sections(msg, sections))
    with pytest.raises(WireFormatError, match="powersgd: Q contain non-finite"):
        atomo_core.decode(with_sections(msg, [p, q.clone().index_fill_(0, torch.tensor([0]), math.nan)]))
    # rank 4 factors of a 3 x 10 matrix: the rank exceeds min(n, m), so the header's rank 4 allows only 3
    small = Message(CODEC_IDS["powersgd"], (3, 10), torch.float32, (4.0,), [torch.zeros(12), torch.zeros(40)])
    with pytest.raises(WireFormatError, match=r"rank 3 of a 3 x 10 matrix needs 9 and 30"):
        atomo_core.decode(bytes(small))


@pytest.mark.parametrize(
    "name,params,error",
    [
        ("topk", (0.0,), "budget"),
        ("topk", (2.5,), "budget"),
        ("topk", (), "expected one parameter"),
        ("topk", (3.0, 1.0), "expected one parameter"),
        ("powersgd", (0.0,), "rank"),
        ("powersgd", (1025.0,), "rank"),
        ("powersgd", (1.5,), "rank"),
        ("powersgd", (), "expected one parameter"),
    ],
)
def test_invalid_header_parameters_are_rejected(name, params, error):
    msg = message(name, {"budget": 3} if name == "topk" else {"rank": 1}, gradient((10, 24), 0))
    with pytest.raises(WireFormatError, match=error):
        atomo_core.decode(bytes(Message(msg.codec_id, msg.shape, msg.dtype, params, msg.sections)))


def test_a_huge_shape_with_small_factors_is_rejected_before_anything_is_allocated():
    """powersgd: a header describing 2**28 entries (1 GiB of fp32) with the factors of a small matrix; the
    factor sizes are checked against the header before the estimate is allocated."""
    msg = message("powersgd", {"rank": 2}, gradient((10, 24), 0))
    huge = Message(msg.codec_id, (2**14, 2**14), msg.dtype, msg.params, msg.sections)
    with pytest.raises(WireFormatError, match="powersgd: rank 2 of a 16384 x 16384 matrix needs 32768"):
        atomo_core.decode(bytes(huge))


@pytest.mark.parametrize("name,params", BIASED)
def test_the_decoded_size_is_bounded_by_the_wire_limits(name, params):
    """topk's k entries are a valid message for any tensor of at least k entries: the size it may describe
    is bounded by WireLimits.max_elements, checked before the codec sees the message."""
    msg = message(name, params, gradient((10, 24), 0))
    huge = Message(msg.codec_id, (2**14, 2**14), msg.dtype, msg.params, msg.sections)
    with pytest.raises(WireFormatError, match="exceeds the limit"):
        atomo_core.decode(bytes(huge), WireLimits(max_elements=1 << 16))


VALID = [bytes(message(name, params, gradient((6, 2, 3, 3), 0))) for name, params in BIASED]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4))
def test_corrupted_bytes_decode_or_raise_wire_format_error(wire, edits):
    data = bytearray(wire)
    for position, value in edits:
        data[position % len(data)] = value
    try:
        estimate = atomo_core.decode(bytes(data), WireLimits(max_elements=1 << 16))
    except WireFormatError:
        return
    assert isinstance(estimate, torch.Tensor) and bool(torch.isfinite(estimate).all())


# -- the per-layer policy -----------------------------------------------------------------------------------


def model_gradients(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for shape in [(16, 8, 3, 3), (16,), (10, 64), (10,)]]


@pytest.mark.parametrize("name,params", BIASED)
def test_policy_keeps_one_memory_per_layer(name, params):
    policy = LayerPolicy(make_codec(name, **params))
    generator = torch.Generator().manual_seed(0)
    computed = [torch.zeros_like(t, dtype=torch.float64) for t in model_gradients(0)]
    sent = [torch.zeros_like(c) for c in computed]
    for step in range(4):
        grads = model_gradients(step)
        messages = policy.encode(grads, generator)
        assert [m.codec_id for m in messages] == [CODEC_IDS[name], 0, CODEC_IDS[name], 0]
        for i, (g, msg) in enumerate(zip(grads, messages, strict=True)):
            computed[i] += g.double()
            sent[i] += atomo_core.decode(bytes(msg)).double()
    for i in (0, 2):  # each matrix's own residual closes its own sums
        torch.testing.assert_close(sent[i] + policy.feedback(i).residual.double(), computed[i], rtol=0, atol=1e-5)
    for i in (1, 3):  # vectors are sent dense: exact, no memory
        assert policy.feedback(i) is None
        torch.testing.assert_close(sent[i], computed[i], rtol=0, atol=1e-5)
    policy.reset_feedback()
    assert policy.feedback(0) is None and policy.feedback(2) is None


def test_an_encode_that_fails_leaves_every_memory_as_it_was():
    policy = LayerPolicy(make_codec("topk", budget=20))
    policy.encode(model_gradients(0))
    before = [policy.feedback(i).residual.clone() for i in (0, 2)]
    grads = model_gradients(1)
    grads[2][0, 0] = math.inf
    with pytest.raises(ValueError, match="non-finite"):
        policy.encode(grads)  # layer 0 encoded, then layer 2 raised
    assert all(torch.equal(policy.feedback(i).residual, r) for i, r in zip((0, 2), before, strict=True))


class UnsizedTopK(TopKCodec):
    """topk whose size the policy cannot know before encoding (like a plugin codec without expected_nbytes)."""

    def expected_nbytes(self, shape):
        return None


def test_the_dense_fallback_keeps_the_feedback_exact():
    """A message larger than dense is replaced by the dense form of the same estimate: the residual, the
    corrected gradient minus what was sent, stays exact."""
    policy = LayerPolicy(UnsizedTopK(budget=40), vector_codec=UnsizedTopK(budget=40))
    shapes = [(4, 15), (120,)]  # 40 of 60 entries at 8 bytes each exceed dense; 40 of 120 do not
    computed, sent = [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes]
    for step in range(3):
        grads = [gradient(shape, 10 * i + step) for i, shape in enumerate(shapes)]
        messages = policy.encode(grads)
        assert [m.codec_id for m in messages] == [CODEC_IDS["dense"], CODEC_IDS["topk"]]
        assert all(len(m) <= dense_nbytes(tuple(g.shape)) for m, g in zip(messages, grads, strict=True))
        for i in range(2):
            computed[i] += grads[i]
            sent[i] += atomo_core.decode(bytes(messages[i]))
    for i in range(2):
        assert int(torch.count_nonzero(atomo_core.decode(bytes(messages[i])))) == 40  # topk's estimate, either form
        assert bool(policy.feedback(i).residual.any())
        torch.testing.assert_close(sent[i] + policy.feedback(i).residual, computed[i], rtol=0, atol=1e-5)


# -- the bias, demonstrated ---------------------------------------------------------------------------------


def mean_and_standard_error(codec, g, reps, seed):
    """Mean and standard error, per entry, of decode(encode(g + noise)) over `reps` stochastic gradients
    with mean g (no error feedback)."""
    generator = torch.Generator().manual_seed(seed)
    samples = np.empty((reps, g.numel()))
    for r in range(reps):
        noisy = g + 0.5 * torch.randn(g.shape, generator=generator)
        samples[r] = atomo_core.decode(bytes(codec.encode(noisy, generator))).reshape(-1).double().numpy()
    return samples.mean(0), samples.std(0, ddof=1) / math.sqrt(reps)


def z_scores(codec, g, reps=1500, seed=0):
    mean, se = mean_and_standard_error(codec, g, reps, seed)
    moved = se > 0
    return np.abs(mean[moved] - g.reshape(-1).double().numpy()[moved]) / se[moved], int(moved.sum())


@pytest.mark.parametrize("name,params", [("topk", {"budget": 20}), ("powersgd", {"rank": 1})])
def test_without_feedback_the_biased_codecs_miss_the_gradient_by_many_standard_errors(name, params):
    """E[C(g~)] != E[g~] = g: the mean of many compressed stochastic gradients stays far from g, whereas
    ATOMO's entrywise codec at the same budget (the control) passes the same test."""
    g = gradient((8, 12), 6)
    bound = stats.norm.isf(1e-3 / (2 * g.numel()))  # two-sided, Bonferroni over the entries
    z, moved = z_scores(make_codec(name, **params), g)
    assert moved > 0 and z.max() > 4 * bound
    z_unbiased, _ = z_scores(make_codec("entrywise", budget=20), g)
    assert z_unbiased.max() < bound


# -- a real run -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_both_codecs_train_over_a_real_ps(tmp_path):
    """A short `atomo train --compare` (one PS, two workers; LeNet-5 on digits): both runs succeed, learn,
    and send fewer bytes than dense by what the codecs' sizes say."""
    steps = 60
    result = subprocess.run(
        [sys.executable, "-m", "services", "train", "--compare", "topk", "powersgd:rank=2", "--steps", str(steps)]
        + ["--eval-every", "30", "--out", str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (comparison,) = (tmp_path / "runs").iterdir()
    summaries = {p.parent.name: json.loads(p.read_text()) for p in comparison.glob("*/summary.json")}
    assert len(summaries) == 2, sorted(summaries)
    shapes = [tuple(p.shape) for p in build_model("lenet5", in_channels=1).parameters()]
    for folder, summary in summaries.items():
        assert summary["state"] == "succeeded" and summary["step"] == steps, (folder, summary["error"])
        assert summary["test_accuracy"] > 0.5, (folder, summary["test_accuracy"])  # chance 0.1; measured 0.78, 0.84
        codec = summary["spec"]["codec"]
        policy = LayerPolicy(make_codec(codec["name"], **CodecSpec(**codec).codec_params()))
        sizes = [policy.codec_for_shape(s).expected_nbytes(s) or dense_nbytes(s) for s in shapes]
        expected = sum(dense_nbytes(s) for s in shapes) / sum(sizes)  # the payloads; the PS also counts headers
        assert 0.9 * expected < summary["compression_ratio"] <= expected, (folder, summary["compression_ratio"])
    assert {s["spec"]["codec"]["name"] for s in summaries.values()} == {"topk", "powersgd"}
