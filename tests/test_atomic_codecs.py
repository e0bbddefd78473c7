"""The ATOMO codecs (entrywise, svd, fourier, and a user's Haar codec): unbiasedness, second moments, wire.

Unbiasedness criterion: per-coordinate z-scores z_i = (mean_i - g_i) / se_i of R Monte Carlo samples,
all within the Bonferroni bound Phi^-1(1 - ALPHA / (2 d)) for d coordinates (valid however the
coordinates are correlated); coordinates that never moved must equal g_i. A deliberately biased variant
(redraw when nothing was selected) must fail it. Second moments E||g^||^2 are compared with Lemma 1,
sum_i lam_i^2 / p_i for orthonormal atoms, within 4.5 estimated standard errors.
"""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.fft
import torch
from scipy import stats

import atomo_core
from atomo_core import WireFormatError, atomic_probabilities, make_codec
from atomo_core.decompositions.spectral import matrix_shape

ALPHA = 1e-3
REPS = 2000
DOC = Path(__file__).resolve().parents[1] / "docs" / "custom-decomposition.md"


@pytest.fixture(scope="module", autouse=True)
def haar_codec():
    """Run the worked example of docs/custom-decomposition.md: it registers the "haar" codec."""
    if "haar" not in atomo_core.codec_names():
        code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
        exec(compile(code, str(DOC), "exec"), {"__name__": "haar_example"})
    return atomo_core.make_codec("haar", budget=1)


def bias_detected(samples: np.ndarray, target: np.ndarray) -> bool:
    reps = samples.shape[0]
    mean = samples.mean(axis=0)
    se = samples.std(axis=0, ddof=1) / math.sqrt(reps)
    moved = se > 0
    if not np.allclose(mean[~moved], target[~moved], rtol=1e-6, atol=1e-7):
        return True
    z = np.abs(mean[moved] - target[moved]) / se[moved]
    return bool(z.max(initial=0.0) > stats.norm.isf(ALPHA / (2 * max(1, moved.sum()))))


def draw(codec, x, reps=REPS, seed=0, redraw_empty=False):
    """reps decoded estimates (numpy, reps x numel), each from bytes; optionally the biased variant."""
    generator = torch.Generator().manual_seed(seed)
    out = np.empty((reps, x.numel()))
    for r in range(reps):
        estimate = atomo_core.decode(bytes(codec.encode(x, generator)))
        while redraw_empty and not bool(estimate.any()):  # biased: conditions on a non-empty sample
            estimate = atomo_core.decode(bytes(codec.encode(x, generator)))
        out[r] = estimate.reshape(-1).double().numpy()
    return out


def make_matrix(seed=0, shape=(4, 6)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.linspace(0.2, 2.0, shape[-1])


def coefficients(name: str, x: torch.Tensor) -> np.ndarray:
    """The decomposition's coefficients computed independently of the codec (x: the matrix for svd)."""
    flat = x.reshape(-1).double().numpy()
    if name == "entrywise":
        return flat
    if name == "fourier":
        return scipy.fft.dct(flat, norm="ortho")
    if name == "svd":
        return np.linalg.svd(x.double().numpy(), compute_uv=False)
    if name == "haar":
        return atomo_core.make_codec("haar", budget=1).decomposition.analysis(x.reshape(-1).double()).numpy()
    raise ValueError(name)


CASES = [
    ("entrywise", {"budget": 5}),
    ("entrywise", {"budget": 2.5, "atom_dtype": "float16"}),
    ("entrywise", {"budget": 20}),  # most atoms clipped
    ("fourier", {"budget": 5}),
    ("svd", {"budget": 1.5}),
    ("svd", {"budget": 2, "reshape": "paper"}),
    ("haar", {"budget": 4}),
]


@pytest.mark.parametrize("name,params", CASES)
def test_unbiased_and_second_moment_is_lemma_1(name, params):
    x = make_matrix(shape=(4, 2, 2) if params.get("reshape") == "paper" else (4, 8))
    if params.get("atom_dtype") == "float16":
        x = x.half().float()  # the clipped weights travel in float16: exact for float16 inputs
    samples = draw(make_codec(name, **params), x)
    assert not bias_detected(samples, x.reshape(-1).double().numpy())
    lam = coefficients(name, x.reshape(matrix_shape(tuple(x.shape), params.get("reshape", "rows"))))
    p = atomic_probabilities(torch.tensor(lam), params["budget"]).numpy()
    nz = lam != 0
    theory = float(np.sum(lam[nz] ** 2 / p[nz]))
    squares = (samples**2).sum(axis=1)
    se = squares.std(ddof=1) / math.sqrt(len(squares))
    assert abs(squares.mean() - theory) <= 4.5 * se + 1e-6 * theory


@pytest.mark.parametrize("name", ["entrywise", "svd", "fourier"])
def test_redrawing_empty_samples_is_detected_as_biased(name):
    """Power check: the criterion rejects the estimator that redraws when nothing was selected."""
    x = make_matrix(shape=(4, 8))
    codec = make_codec(name, budget=1)
    generator = torch.Generator().manual_seed(7)
    empty = sum(not bool(atomo_core.decode(codec.encode(x, generator)).any()) for _ in range(200))
    assert empty > 0  # the biased variant differs from the estimator only if empty samples occur
    samples = draw(codec, x, reps=1000, redraw_empty=True)
    assert bias_detected(samples, x.reshape(-1).double().numpy())


def test_empty_sample_decodes_to_zeros():
    x = torch.tensor([[1e-3, 0.0], [0.0, 1e-3]])
    codec = make_codec("entrywise", budget=0.01)
    generator = torch.Generator().manual_seed(0)
    messages = [codec.encode(x, generator) for _ in range(50)]
    empty = [m for m in messages if m.sections[0].numel() + m.sections[3].numel() == 0]  # no atom index
    assert empty, "budget 0.01 selects nothing most of the time"
    assert torch.equal(atomo_core.decode(bytes(empty[0])), torch.zeros(2, 2))


@pytest.mark.parametrize(
    "name,params",
    [*CASES, ("svd", {"budget": 3, "atom_dtype": "float16"}), ("fourier", {"budget": 3, "atom_dtype": "float16"})],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_round_trip_shape_dtype_and_reproducibility(name, params, dtype):
    x = make_matrix(seed=3, shape=(8, 2, 2)).to(dtype)
    codec = make_codec(name, **params)
    msg = codec.encode(x, torch.Generator().manual_seed(5))
    wire = bytes(msg)
    assert len(wire) == len(msg)
    assert wire == bytes(codec.encode(x, torch.Generator().manual_seed(5)))  # a generator fixes the sample
    for estimate in (codec.decode(msg), codec.decode(wire), atomo_core.decode(wire)):
        assert estimate.shape == x.shape and estimate.dtype == dtype
        assert bool(torch.isfinite(estimate).all())
    out = torch.ones(x.shape, dtype=torch.float32)
    codec.decode_add_(wire, out, alpha=-0.5)
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2  # decode() rounds to the tensor's dtype
    torch.testing.assert_close(out, 1 - 0.5 * atomo_core.decode(wire).float(), rtol=tol, atol=tol)


def test_budget_at_least_rank_is_exact():
    """With s >= rank every atom has p = 1: the estimate is the matrix itself (Appendix B, consequence 1)."""
    x = make_matrix(shape=(5, 7))
    for name, budget in [("svd", 5), ("entrywise", 35), ("fourier", 35)]:
        estimate = atomo_core.decode(bytes(make_codec(name, budget=budget).encode(x)))
        torch.testing.assert_close(estimate, x, rtol=1e-5, atol=1e-5)


def test_svd_is_exact_for_ill_conditioned_matrices():
    """Singular values spanning 1e-6..1: every atom's factor comes from X itself, so s = rank is exact."""
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    v, _ = torch.linalg.qr(torch.randn(40, 6, generator=g))
    x = (u * torch.logspace(0, -6, 6)) @ v.T
    estimate = atomo_core.decode(bytes(make_codec("svd", budget=6).encode(x.T.contiguous())))
    torch.testing.assert_close(estimate, x.T, rtol=0, atol=1e-6)


def test_svd_of_a_rank_deficient_gradient_with_dead_units_is_finite_and_exact():
    """A real LeNet-5 fc2 gradient (84 x 120, 39 zero rows, rank 22) on which fp32 eigh of X X^T gave NaN."""
    x = torch.from_numpy(np.load(Path(__file__).parent / "data" / "lenet5_fc2_gradient.npy"))
    estimate = atomo_core.decode(bytes(make_codec("svd", budget=84, basis="exact").encode(x)))
    torch.testing.assert_close(estimate, x, rtol=0, atol=1e-6)
    for basis in ("exact", "warm"):
        codec = make_codec("svd", budget=3, basis=basis)
        sampled = atomo_core.decode(bytes(codec.encode(x, torch.Generator().manual_seed(0))))
        assert bool(torch.isfinite(sampled).all())
    everything = make_codec("svd", budget=84 + 32, basis="warm")  # n + r atoms: all kept
    torch.testing.assert_close(atomo_core.decode(bytes(everything.encode(x))), x, rtol=0, atol=1e-6)


def test_svd_encodes_every_gradient_of_a_real_training_run():
    """Late in training half the MLP's hidden units are dead and its 256 x 1024 gradient has rank ~10: fp32
    eigh of the full Gram matrix failed to converge on 139 of 600 such steps before zero rows were dropped."""
    from atomo_core.data import BatchStream, load_dataset
    from atomo_core.models import build_model

    torch.manual_seed(0)
    train, _, info = load_dataset("digits")
    model = build_model("mlp", info.num_classes, info.in_channels)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    stream = BatchStream(train, 0, 1, 32, seed=0)
    codec = make_codec("svd", budget=3, basis="exact")  # the eigensolver's route (the warm one has no eigh here)
    for step in range(200):
        x, y = stream.batch(step)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for p in model.parameters():
            if p.dim() >= 2:
                estimate = atomo_core.decode(bytes(codec.encode(p.grad, torch.Generator().manual_seed(step))))
                assert bool(torch.isfinite(estimate).all()), f"step {step}"
        optimizer.step()


def test_svd_vector_is_one_row_and_sent_whole():
    x = torch.randn(10, generator=torch.Generator().manual_seed(0))
    estimate = atomo_core.decode(bytes(make_codec("svd", budget=1).encode(x)))
    torch.testing.assert_close(estimate, x)


def test_svd_paper_reshape_keeps_1x1_convolutions_as_out_by_in():
    assert matrix_shape((64, 32, 3, 3), "paper") == (1024, 18)
    assert matrix_shape((64, 32, 1, 1), "paper") == (64, 32)
    assert matrix_shape((64, 32, 3, 3), "rows") == (64, 288)
    assert matrix_shape((10, 512), "paper") == (10, 512)


def test_svd_decode_add_uses_the_device_and_dtype_of_out():
    x = make_matrix(shape=(6, 9))
    msg = make_codec("svd", budget=2).encode(x, torch.Generator().manual_seed(2))
    out = torch.zeros(6, 9, dtype=torch.float64)
    make_codec("svd", budget=2).decode_add_(msg, out, alpha=2.0)
    torch.testing.assert_close(out, 2 * atomo_core.decode(msg).double(), rtol=1e-6, atol=1e-6)
    transposed = torch.zeros(9, 6).T  # not contiguous: added through a materialized estimate
    make_codec("svd", budget=2).decode_add_(msg, transposed)
    torch.testing.assert_close(transposed, atomo_core.decode(msg), rtol=1e-6, atol=1e-6)
    with pytest.raises(WireFormatError, match="shape"):
        make_codec("svd", budget=2).decode_add_(msg, torch.zeros(9, 6))


def test_float16_atoms_stay_close_to_float32_atoms():
    """Same sample, atoms rounded to float16: the estimate moves by about float16's resolution only."""
    x = make_matrix(shape=(16, 24))
    exact = atomo_core.decode(make_codec("svd", budget=3).encode(x, torch.Generator().manual_seed(4)))
    rounded = atomo_core.decode(
        make_codec("svd", budget=3, atom_dtype="float16").encode(x, torch.Generator().manual_seed(4))
    )
    assert float((rounded - exact).norm() / exact.norm()) < 2e-3


def test_fourier_coefficients_match_scipy_dct():
    from atomo_core.decompositions import dct, idct

    for n in [1, 2, 7, 64, 1001]:
        x = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
        np.testing.assert_allclose(dct(x).numpy(), scipy.fft.dct(x.numpy(), norm="ortho"), atol=1e-12)
        torch.testing.assert_close(idct(dct(x)), x, rtol=0, atol=1e-12)


def test_entrywise_wire_cost_is_an_index_and_a_sign_bit_per_unclipped_atom():
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    msg = make_codec("entrywise", budget=1000).encode(x, torch.Generator().manual_seed(0))
    shared, signs, scale, exact_index, exact = (s.numel() for s in msg.sections)
    assert exact == exact_index and scale == 1 and signs == -(-shared // 8)
    payload = len(msg) - len(msg.header())
    assert payload <= 4 * shared + shared / 8 + 8 * exact + 4 * 8  # plus padding of five sections


def test_invalid_parameters_are_value_errors():
    with pytest.raises(ValueError, match="budget"):
        make_codec("svd", budget=0)
    with pytest.raises(ValueError, match="reshape"):
        make_codec("svd", budget=1, reshape="columns")
    with pytest.raises(ValueError, match="atom_dtype"):
        make_codec("entrywise", budget=1, atom_dtype="int8")
    with pytest.raises(ValueError, match="svd"):
        make_codec("svd", budget=1, bits=3)
