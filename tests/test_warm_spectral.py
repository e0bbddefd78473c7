"""The warm spectral basis (svd basis="warm"): exactness of Q B^T + R, unbiasedness, the second moment with
cross terms, the encoder state through LayerPolicy and its checkpoint, and the wire form of residual rows.

Unbiasedness uses the Bonferroni z-test of tests/test_atomic_codecs.py (`bias_detected`); a variant that
never sends the residual rows (a truncated top-r method) must fail it.
"""

import io
import math

import numpy as np
import pytest
import torch
from test_atomic_codecs import bias_detected

import atomo_core
from atomo_core import LayerPolicy, WireFormatError, atomic_probabilities, make_codec
from atomo_core.biased import Feedback
from atomo_core.decompositions import spectral
from atomo_core.wire import CODEC_IDS, Message

REPS = 2000


def low_rank_plus_noise(shape=(12, 40), rank=3, noise=0.05, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    left, right = torch.randn(shape[0], rank, generator=g), torch.randn(rank, shape[1], generator=g)
    return left @ right * torch.linspace(0.3, 1.5, shape[1]) + noise * torch.randn(shape, generator=g)


def warm_codec(budget, rank=4, **options):
    return make_codec("svd", budget=budget, basis="warm", rank=rank, **options)


def warm_samples(codec, x, state, reps=REPS, seed=0) -> np.ndarray:
    """reps decoded estimates (reps x numel), each from bytes, all from the same warm basis `state`."""
    generator = torch.Generator().manual_seed(seed)
    out = np.empty((reps, x.numel()))
    for i in range(reps):
        msg, _ = codec.encode_with_state(x, state, generator)
        out[i] = atomo_core.decode(bytes(msg)).reshape(-1).double().numpy()
    return out


def previous_basis(codec, shape=(12, 40), seed=5):
    """A warm basis from another matrix: the state one step later, far from x's own subspace."""
    return codec.encode_with_state(low_rank_plus_noise(shape, seed=seed), None, torch.Generator().manual_seed(9))[1]


@pytest.mark.parametrize(
    "shape,dtype",
    [((12, 40), torch.float32), ((40, 12), torch.float32), ((16, 8, 3, 3), torch.float32), ((70, 300), torch.float64)],
)
def test_atoms_sum_to_the_gradient_for_any_basis(shape, dtype):
    """Q B^T + R = Y to rounding, for the CholQR2 basis and for a deliberately bad one; with every atom kept
    (p = 1) the decoded estimate is the gradient."""
    x = low_rank_plus_noise((shape[0], math.prod(shape[1:])), seed=1).reshape(shape).to(dtype)
    codec = warm_codec(budget=10_000)
    rows, columns = spectral.matrix_shape(shape, "rows")
    y = x.reshape(rows, columns) if rows <= columns else x.reshape(rows, columns).T
    n = y.shape[0]
    for state in (None, torch.randn(n, 4, dtype=dtype, generator=torch.Generator().manual_seed(2)) * 1e3):
        lam, parts, basis = codec.decomposition.decompose_with_state(x, state, torch.Generator().manual_seed(3))
        assert lam.shape == (4 + n,) and basis.shape == (n, 4)
        tol = 1e-6 if dtype == torch.float32 else 1e-13
        torch.testing.assert_close(parts.q @ parts.b.T + parts.residual, y, rtol=0, atol=tol * float(y.abs().max()))
        orthogonality = 1e-6 if dtype == torch.float32 else 1e-10  # the second pass's shift: about 1e-12
        torch.testing.assert_close(basis.T @ basis, torch.eye(4, dtype=dtype), rtol=0, atol=orthogonality)
        msg, _ = codec.encode_with_state(x, state, torch.Generator().manual_seed(4))
        assert msg.sections[3].numel() == int(torch.count_nonzero(parts.residual.abs().amax(dim=1)))
        estimate = atomo_core.decode(bytes(msg))
        torch.testing.assert_close(estimate, x, rtol=0, atol=1e-5 * float(x.abs().max()))  # float32 on the wire


def test_rank_deficient_and_zero_gradients_stay_finite_and_exact():
    """Rank 2 < r (CholQR2's shift keeps Cholesky defined), dead rows, and an all-zero gradient."""
    x = low_rank_plus_noise((20, 50), rank=2, noise=0.0, seed=3)
    x[::3] = 0.0
    for tensor in (x, torch.zeros(20, 50)):
        msg, basis = warm_codec(budget=1000, rank=6).encode_with_state(tensor, None, torch.Generator().manual_seed(0))
        assert bool(torch.isfinite(basis).all())
        torch.testing.assert_close(atomo_core.decode(bytes(msg)), tensor, rtol=0, atol=1e-6)
        assert bool(torch.isfinite(atomo_core.decode(bytes(warm_codec(budget=2, rank=6).encode(tensor)))).all())


@pytest.mark.parametrize("shape,budget", [((12, 40), 2.0), ((40, 12), 3.5)])
def test_unbiased_from_a_stale_basis_and_second_moment_has_no_cross_terms(shape, budget):
    """Unbiased whatever Q is (here: another matrix's basis); with Q^T Q = I the second moment is Lemma 1's
    sum lam_i^2 / p_i, the cross terms summing to zero."""
    x = low_rank_plus_noise(shape, seed=4)
    codec = warm_codec(budget)
    state = previous_basis(codec, shape)
    samples = warm_samples(codec, x, state)
    assert not bias_detected(samples, x.reshape(-1).double().numpy())
    lam, _, _ = codec.decomposition.decompose_with_state(x, state, None)
    lam = lam.double()
    p = atomic_probabilities(lam, budget)
    assert float(p[4:].sum()) > 0.05  # residual rows are drawn: they are part of what is tested
    theory = float((lam[p > 0] ** 2 / p[p > 0]).sum())
    squares = (samples**2).sum(axis=1)
    se = squares.std(ddof=1) / math.sqrt(REPS)
    assert abs(squares.mean() - theory) <= 4.5 * se + 1e-6 * theory


def test_second_moment_with_a_non_orthonormal_basis_includes_the_cross_terms(monkeypatch):
    """A basis that is not orthonormal (CholQR2 replaced by a skewed one): still unbiased, and
    E||g^||^2 = sum_i lam_i^2 / p_i + ||Y||^2 - sum_i lam_i^2, which differs from Lemma 1's sum lam_i^2 / p_i."""
    skew = torch.tensor([[1.0, 0.9, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.0], [0.0, 0.0, 0.7, 2.0]])
    monkeypatch.setattr(spectral, "cholesky_qr2", lambda z: z / z.norm(dim=0).clamp(min=1e-30) @ skew)
    x = low_rank_plus_noise((12, 40), seed=6)
    codec = warm_codec(budget=3.0)
    state = torch.randn(12, 4, generator=torch.Generator().manual_seed(2))  # fixed: the same Q in every sample
    samples = warm_samples(codec, x, state, seed=1)
    assert not bias_detected(samples, x.reshape(-1).double().numpy())
    lam, _, _ = codec.decomposition.decompose_with_state(x, state, None)
    lam = lam.double()
    p = atomic_probabilities(lam, 3.0)
    norm2 = float(x.double().pow(2).sum())
    lemma_1 = float((lam[p > 0] ** 2 / p[p > 0]).sum())
    theory = lemma_1 + norm2 - float((lam**2).sum())
    squares = (samples**2).sum(axis=1)
    se = squares.std(ddof=1) / math.sqrt(REPS)
    assert abs(squares.mean() - theory) <= 4.5 * se + 1e-6 * theory
    assert abs(squares.mean() - lemma_1) > 10 * se  # the cross terms are large here: the formula is tested


class TopOnlyDecomposition(spectral.SpectralDecomposition):
    """BIASED: the residual rows' coefficients set to 0, so they are never sent (a truncated top-r method)."""

    def decompose_with_state(self, tensor, state, generator):
        lam, parts, basis = super().decompose_with_state(tensor, state, generator)
        if isinstance(parts, spectral._Warm):
            lam = torch.cat([lam[: parts.r], torch.zeros_like(lam[parts.r :])])
        return lam, parts, basis


def test_a_variant_without_residual_rows_is_detected_as_biased():
    x = low_rank_plus_noise((12, 40), seed=4)
    codec = warm_codec(2.0)
    state = previous_basis(codec)
    biased = warm_codec(2.0)
    biased.decomposition = TopOnlyDecomposition("rows", "float32", "warm", 4)
    assert bias_detected(warm_samples(biased, x, state, reps=1000), x.reshape(-1).double().numpy())


def test_state_is_the_next_basis_and_a_generator_fixes_the_message():
    x = low_rank_plus_noise((12, 40), seed=7)
    codec = warm_codec(2.0)
    first = [codec.encode_with_state(x, None, torch.Generator().manual_seed(1)) for _ in range(2)]
    assert bytes(first[0][0]) == bytes(first[1][0]) and torch.equal(first[0][1], first[1][1])
    second = codec.encode_with_state(x, first[0][1], torch.Generator().manual_seed(1))[1]
    # One more subspace-iteration step from a basis of x itself: x's rank-3 signal subspace stays in it.
    overlap = torch.linalg.svdvals(first[0][1].T @ second)
    assert float(overlap[:3].min()) > 0.99
    with pytest.raises(ValueError, match="warm basis of shape"):
        codec.encode_with_state(x, torch.zeros(12, 5), None)


def test_small_layers_keep_the_exact_route_and_layout():
    """n <= 2 r: the exact eigendecomposition and the three-section message, no state."""
    x = low_rank_plus_noise((8, 40), seed=1)
    msg, state = warm_codec(2.0, rank=4).encode_with_state(x, None, torch.Generator().manual_seed(0))
    assert state is None and len(msg.sections) == 3
    msg, state = warm_codec(2.0, rank=3).encode_with_state(x, None, torch.Generator().manual_seed(0))
    assert state.shape == (8, 3) and len(msg.sections) == 5
    assert make_codec("svd", budget=2, basis="exact").encode_with_state(x, None)[1] is None


def test_decode_add_matches_decode_for_both_orientations():
    for shape in [(12, 40), (40, 12)]:
        x = low_rank_plus_noise(shape, seed=2)
        codec = warm_codec(5.0)
        msg = codec.encode(x, torch.Generator().manual_seed(3))
        assert msg.sections[3].numel() > 0
        out = torch.ones(shape, dtype=torch.float64)
        codec.decode_add_(bytes(msg), out, alpha=-2.0)
        torch.testing.assert_close(out, 1 - 2 * atomo_core.decode(bytes(msg)).double(), rtol=1e-6, atol=1e-6)
        strided = torch.zeros(shape[::-1]).T  # not contiguous: through a materialized estimate
        codec.decode_add_(bytes(msg), strided)
        torch.testing.assert_close(strided, atomo_core.decode(bytes(msg)), rtol=1e-6, atol=1e-6)


def test_float16_atoms_round_the_rows_only():
    x = low_rank_plus_noise((12, 40), seed=8)
    exact = atomo_core.decode(warm_codec(5.0).encode(x, torch.Generator().manual_seed(4)))
    half = warm_codec(5.0, atom_dtype="float16").encode(x, torch.Generator().manual_seed(4))
    assert half.sections[4].dtype == torch.float16 and half.sections[0].dtype == torch.float32
    assert float((atomo_core.decode(bytes(half)) - exact).norm() / exact.norm()) < 2e-3


def test_invalid_options_are_value_errors():
    with pytest.raises(ValueError, match="basis"):
        make_codec("svd", budget=1, basis="fast")
    for rank in (0, 2.5, 1025, True):
        with pytest.raises(ValueError, match="rank"):
            make_codec("svd", budget=1, basis="warm", rank=rank)


# The encoder state through LayerPolicy --------------------------------------------------------------------


def model_gradients(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for shape in [(16, 8, 3, 3), (16,), (24, 10)]]


def test_policy_keeps_the_warm_basis_per_layer():
    policy = LayerPolicy(warm_codec(2.0, rank=4))
    policy.encode(model_gradients(0), torch.Generator().manual_seed(0))
    assert policy.state(0).shape == (16, 4) and policy.state(1) is None and policy.state(2).shape == (10, 4)
    assert policy.feedback(0) is None
    policy.reset_feedback()
    assert policy.state(0) is None


def test_policy_state_checkpoint_round_trip():
    """Warm bases and PowerSGD's feedback through torch.save / torch.load(weights_only=True): the restored
    policy encodes the next step to the same bytes as the one that kept running."""
    policies = [LayerPolicy(warm_codec(2.0, rank=4)), LayerPolicy(make_codec("powersgd", rank=2))]
    for policy in policies:
        for step in range(2):
            policy.encode(model_gradients(step), torch.Generator().manual_seed(step))
        buffer = io.BytesIO()
        torch.save(policy.state_dict(), buffer)
        buffer.seek(0)
        restored = LayerPolicy(policy.codec)
        restored.load_state_dict(torch.load(buffer, weights_only=True))
        for step in (2, 3):
            grads = model_gradients(step)
            kept = [bytes(m) for m in policy.encode(grads, torch.Generator().manual_seed(step))]
            resumed = [bytes(m) for m in restored.encode(grads, torch.Generator().manual_seed(step))]
            assert kept == resumed
    assert isinstance(policies[1].feedback(0), Feedback)


@pytest.mark.parametrize(
    "state,problem",
    [
        ({"layers": {}}, "version"),
        ({"version": 1, "layers": []}, "'layers'"),
        ({"version": 1, "layers": {-1: {"kind": "basis", "basis": torch.zeros(2, 2)}}}, "index"),
        ({"version": 1, "layers": {0: {"kind": "basis", "basis": torch.zeros(4)}}}, "2 dimensions"),
        ({"version": 1, "layers": {0: {"kind": "basis", "basis": torch.full((2, 2), math.nan)}}}, "non-finite"),
        ({"version": 1, "layers": {0: {"kind": "basis", "basis": torch.zeros(2, 2, dtype=torch.int64)}}}, "float"),
        ({"version": 1, "layers": {0: {"kind": "moment", "basis": torch.zeros(2, 2)}}}, "unknown entry"),
        ({"version": 1, "layers": {0: {"kind": "feedback", "residual": torch.zeros(3)}}}, "unknown entry"),
    ],
)
def test_malformed_policy_state_is_rejected_and_changes_nothing(state, problem):
    policy = LayerPolicy(warm_codec(2.0, rank=4))
    policy.encode(model_gradients(0), torch.Generator().manual_seed(0))
    before = policy.state_dict()
    with pytest.raises(ValueError, match=problem):
        policy.load_state_dict(state)
    after = policy.state_dict()
    assert after.keys() == before.keys() and all(
        torch.equal(after["layers"][i]["basis"], before["layers"][i]["basis"]) for i in before["layers"]
    )


def test_a_restored_basis_of_another_shape_is_a_clear_error():
    policy = LayerPolicy(warm_codec(2.0, rank=4))
    policy.load_state_dict({"version": 1, "layers": {0: {"kind": "basis", "basis": torch.zeros(16, 3)}}})
    with pytest.raises(ValueError, match="warm basis of shape"):
        policy.encode(model_gradients(0))


# The wire form ------------------------------------------------------------------------------------------------


def warm_message(**replacements) -> bytes:
    x = low_rank_plus_noise((12, 40), seed=4)
    msg = warm_codec(6.0).encode(x, torch.Generator().manual_seed(0))
    assert msg.sections[0].numel() - msg.sections[3].numel() >= 1 and msg.sections[3].numel() >= 2
    sections = list(msg.sections)
    for index, section in replacements.items():
        sections[int(index[1:])] = section
    return bytes(Message(msg.codec_id, msg.shape, msg.dtype, msg.params, sections))


def test_valid_warm_message_decodes():
    assert atomo_core.decode(warm_message()).shape == (12, 40)


def residual_rows(index: list[int], width: int = 40, dtype=torch.float32) -> dict:
    """Sections 0, 3 and 4 for the message's top atoms plus residual rows at `index`."""
    msg = atomo_core.wire.decode_message(warm_message())
    top = msg.sections[0].numel() - msg.sections[3].numel()
    return {
        "s0": torch.ones(top + len(index)),
        "s3": torch.tensor(index, dtype=torch.int32),
        "s4": torch.ones(len(index) * width, dtype=dtype),
    }


@pytest.mark.parametrize(
    "replacements,problem",
    [
        (residual_rows([0, 12]), "must lie in"),
        (residual_rows([-1, 3]), "must lie in"),
        (residual_rows([4, 4]), "strictly increasing"),
        (residual_rows([5, 2]), "strictly increasing"),
        ({**residual_rows([1, 2]), "s4": torch.ones(79)}, "need 80 entries"),
        ({**residual_rows([1, 2]), "s0": torch.ones(1)}, "weights for 2 residual rows"),
        ({**residual_rows([1, 2]), "s0": torch.ones(9)}, "at most 4 top atoms"),
        (residual_rows(list(range(13))), "must lie in|at most"),
        (residual_rows([1, 2], dtype=torch.float16), "dtypes"),
        ({**residual_rows([1, 2]), "s3": torch.tensor([1, 2], dtype=torch.int64)}, "dtypes"),
        ({**residual_rows([1, 2]), "s4": torch.full((80,), math.inf)}, "non-finite"),
        ({"s1": torch.ones(11)}, "factor entries"),
    ],
)
def test_warm_sections_are_validated(replacements, problem):
    with pytest.raises(WireFormatError, match=problem):
        atomo_core.decode(warm_message(**replacements))


def test_a_warm_message_for_a_small_layer_must_use_the_exact_layout():
    msg = atomo_core.wire.decode_message(warm_message())
    small = Message(msg.codec_id, (8, 40), msg.dtype, msg.params, msg.sections)  # n = 8 <= 2 r
    with pytest.raises(WireFormatError, match="dtypes"):
        atomo_core.decode(bytes(small))


@pytest.mark.parametrize(
    "params,problem",
    [
        ((2.0, 0.0, 0.0, 0.0, 4.0), "basis code"),
        ((2.0, 0.0, 0.0, 1.0, 0.0), "rank"),
        ((2.0, 0.0, 0.0, 1.0, 4.5), "rank"),
        ((2.0, 0.0, 0.0, 1.0, 1e9), "rank"),
        ((2.0, 0.0, 0.0, 1.0), "4 \\(reshape"),
    ],
)
def test_warm_header_parameters_are_validated(params, problem):
    with pytest.raises(WireFormatError, match=problem):
        atomo_core.decode(bytes(Message(CODEC_IDS["svd"], (12, 40), torch.float32, params, [])))


def _unrotated(codec, x, state):
    """(lam, Q, B) of the warm route without the Rayleigh-Ritz rotation (V = I), on the same subspace."""
    d = codec.decomposition
    y, transposed, r = d._view(x)
    q, b = d._warm_subspace(y, r, state, None)
    lam, _, _ = d._warm_atoms(y, q, b, torch.eye(r), transposed)
    return lam, q, b


def test_rayleigh_ritz_makes_the_top_atoms_the_singular_pairs_within_the_subspace():
    """The rotated top atoms' coefficients are the singular values of B = Y^T Q (descending), their sum (B's
    nuclear norm) is below the unrotated basis's, the next step's basis spans the same subspace, and
    Algorithm 1's variance sum_i lam_i^2 (1 / p_i - 1) on the same subspace is lower."""
    x = low_rank_plus_noise((30, 80), rank=6, noise=0.2, seed=11)
    codec = warm_codec(budget=3.0, rank=8)
    state = previous_basis(codec, shape=(30, 80))
    lam, parts, basis = codec.decomposition.decompose_with_state(x, state, None)
    plain, q, b = _unrotated(codec, x, state)
    top = lam[: parts.r].double()
    assert torch.allclose(top, torch.linalg.svdvals(b.double()), rtol=1e-4)
    assert bool((top[:-1] >= top[1:]).all())
    assert float(top.sum()) < 0.99 * float(plain[: parts.r].double().sum())
    assert torch.allclose(basis.T @ basis, torch.eye(parts.r), atol=1e-5)
    assert float(torch.linalg.svdvals(basis.T @ q)[-1]) > 1 - 1e-5  # span(Q V) = span(Q)
    y = x.reshape(30, 80)
    assert torch.allclose(parts.q @ parts.b.T + parts.residual, y, atol=1e-5)

    def variance(coefficients):
        coefficients = coefficients.double()
        p = atomic_probabilities(coefficients, 3.0)
        kept = p > 0
        return float((coefficients[kept] ** 2 * (1 / p[kept] - 1)).sum())

    assert variance(lam) < 0.95 * variance(plain)


def test_rotation_of_a_non_finite_basis_is_the_identity_and_spares_the_other_layers():
    g = torch.Generator().manual_seed(3)
    good, bad = torch.randn(50, 4, generator=g), torch.randn(60, 4, generator=g)
    bad[7, 1] = float("nan")
    rotations = spectral.ritz_rotations([good, bad])
    assert torch.equal(rotations[1], torch.eye(4))
    assert torch.allclose(rotations[0], spectral.ritz_rotations([good])[0])
    assert torch.allclose(rotations[0].T @ rotations[0], torch.eye(4), atol=1e-6)


def _layers_for_many():
    """A warm layer, a transposed one, a convolution, one small enough for the exact route and a 1-D one."""
    shapes = [(12, 40), (40, 12), (16, 8, 3, 3), (6, 20), (9,)]
    return [low_rank_plus_noise((s[0], math.prod(s[1:])), seed=20 + i).reshape(s) for i, s in enumerate(shapes)]


def test_decompose_many_is_decompose_with_state_layer_by_layer():
    """The batched decomposition (one eigh for all warm layers) gives each layer's per-layer result, from the
    same generator stream (cold layers draw their sketches in order) and from given states."""
    codec = warm_codec(budget=3.0, rank=4)
    d = codec.decomposition
    tensors = _layers_for_many()
    stale = previous_basis(codec)
    for states in ([None] * 5, [stale, None, None, None, None]):
        many = d.decompose_many(tensors, states, torch.Generator().manual_seed(4))
        gen = torch.Generator().manual_seed(4)
        single = [d.decompose_with_state(t, s, gen) for t, s in zip(tensors, states, strict=True)]
        for (lam_m, parts_m, next_m), (lam_s, parts_s, next_s) in zip(many, single, strict=True):
            assert type(parts_m) is type(parts_s)
            assert torch.allclose(lam_m, lam_s, rtol=1e-5, atol=1e-7)
            assert (next_m is None) == (next_s is None)
            if next_m is not None:
                assert torch.allclose(next_m, next_s, atol=1e-5)


def test_batched_gram_eigen_matches_the_singular_values_and_keeps_zero_rows_apart():
    """The CUDA route's batched eigensolver, run here on the CPU: same n, different m, a zero row, a NaN layer
    (no solver error; the others untouched)."""
    g = torch.Generator().manual_seed(8)
    ys = [torch.randn(6, m, generator=g) for m in (10, 25, 7)]
    ys[1][2] = 0
    nan = torch.randn(6, 9, generator=g)
    nan[0, 0] = float("nan")
    results = spectral._gram_eigen_batched([*ys, nan])
    for y, (eigenvalues, u) in zip(ys, results, strict=False):
        assert torch.allclose(
            eigenvalues.sort().values,
            torch.linalg.svdvals(y.double()).pow(2).sort().values.float(),
            rtol=1e-4,
            atol=1e-5,
        )
        assert torch.allclose(u.T @ u, torch.eye(6), atol=1e-5)
        assert torch.allclose(u @ torch.diag(eigenvalues) @ u.T, y @ y.T, atol=1e-4)
    zero_row = results[1][1][2].abs()
    assert float(zero_row.max()) == pytest.approx(1.0) and int((zero_row > 0.5).sum()) == 1
    assert not bool(torch.isfinite(results[3][0]).all())  # NaN coefficients, for Algorithm 1 to reject


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: none here")
def test_decompose_many_on_cuda_matches_the_per_layer_route():
    """On CUDA the exact layers' Gram matrices are solved per size in one eigh too."""
    tensors = [t.cuda() for t in _layers_for_many()]
    for basis in ("exact", "warm"):
        d = make_codec("svd", budget=3.0, basis=basis, rank=4).decomposition
        many = d.decompose_many(tensors, [None] * 5, torch.Generator("cuda").manual_seed(4))
        gen = torch.Generator("cuda").manual_seed(4)
        single = [d.decompose_with_state(t, None, gen) for t in tensors]
        for (lam_m, _, _), (lam_s, _, _) in zip(many, single, strict=True):
            assert torch.allclose(lam_m, lam_s, rtol=1e-4, atol=1e-6)


def test_the_cuda_eigensolver_route_run_here_matches_the_cpu_route(monkeypatch):
    """The exact layers' batched float64 route (CUDA's), forced on the CPU: the same coefficients as the
    per-layer float32 route, which drops a zero row where this one keeps it as an atom of coefficient ~0."""
    tensors = _layers_for_many()
    tensors[1] = tensors[1].clone()
    tensors[1][:, 3] = 0  # a zero row of Y (the layer is transposed)
    d = make_codec("svd", budget=3.0).decomposition
    single = [d.decompose_with_state(t, None, None) for t in tensors]
    monkeypatch.setattr(spectral, "batched_exact_route", lambda y: True)
    many = d.decompose_many(tensors, [None] * 5, None)
    for (lam_m, parts_m, _), (lam_s, _, _) in zip(many, single, strict=True):
        scale = float(lam_s.max())
        ordered = lam_m.sort(descending=True).values
        assert torch.allclose(ordered[: lam_s.numel()], lam_s.sort(descending=True).values, atol=1e-5 * scale)
        floor = math.sqrt(torch.finfo(torch.float32).eps) * scale  # `decompose`'s floor on eigenvalue 0
        extra = ordered[lam_s.numel() :]
        assert extra.numel() == (1 if parts_m is many[1][1] else 0)
        assert float(extra.abs().sum()) <= 1.01 * floor
        assert torch.allclose(parts_m.u.T @ parts_m.u, torch.eye(parts_m.u.shape[1]), atol=1e-5)
