import gzip

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from atomo_core.data import (
    DATASETS,
    VISION,
    BatchStream,
    DatasetUnavailableError,
    Split,
    load_dataset,
    random_crop_flip,
    shard_indices,
    torchvision_problem,
)
from atomo_core.models import build_model
from services.common.spec import DATASETS as SPEC_DATASETS
from services.common.spec import VISION_DATASETS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_names_match_the_run_spec():
    assert DATASETS == SPEC_DATASETS
    assert VISION == VISION_DATASETS


def test_unknown_data_set_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown data set 'imagenet'.*digits.*cifar10"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="train_size must be positive"):
        load_dataset("digits", train_size=0)
    with pytest.raises(ValueError, match="at most 100000"):
        load_dataset("synthetic", train_size=10**9)


def test_vision_data_set_without_torchvision_or_data_is_a_clear_error(tmp_path):
    if torchvision_problem() is not None:  # not installed, or built for another torch
        with pytest.raises(ImportError, match=r"cifar10 needs torchvision.*pip install -e '\.\[vision\]'"):
            load_dataset("cifar10", root=tmp_path)
    else:
        with pytest.raises(DatasetUnavailableError, match=f"'cifar10' is not under {tmp_path}"):
            load_dataset("cifar10", root=tmp_path, download=False)


def test_digits_shapes_labels_and_normalisation(digits):
    train, test, info = digits
    assert (info.num_classes, info.in_channels, info.image_size, info.augment) == (10, 1, 32, "none")
    assert (info.train_size, info.test_size) == (len(train), len(test)) == (1497, 300)
    assert train.x.shape == (1497, 1, 32, 32) and test.x.shape == (300, 1, 32, 32)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert train.y.min() == 0 and train.y.max() == 9 and test.y.min() == 0 and test.y.max() == 9
    # Stratified: each of the 10 classes has about 30 test images.
    assert test.y.bincount(minlength=10).min() >= 28 and test.y.bincount(minlength=10).max() <= 32
    assert abs(train.x.mean().item()) < 1e-5 and abs(train.x.std().item() - 1) < 1e-5
    # The test set is normalised with the training statistics: close to, not exactly, standard.
    assert abs(test.x.mean().item()) < 0.1 and abs(test.x.std().item() - 1) < 0.1


def test_digits_split_is_fixed_and_subsets_are_prefixes(digits):
    train, test, _ = digits
    again_train, again_test, _ = load_dataset("digits", seed=5)
    assert torch.equal(train.x, again_train.x) and torch.equal(test.y, again_test.y)
    small_train, small_test, info = load_dataset("digits", train_size=100, test_size=50)
    assert (info.train_size, info.test_size) == (100, 50)
    assert torch.equal(small_train.x, train.x[:100]) and torch.equal(small_test.y, test.y[:50])


def train_and_score(model, train, test, steps, lr, batch_size=32):
    """Plain SGD through a BatchStream; returns the test accuracy."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    stream = BatchStream(train, 0, 1, batch_size, seed=0)
    for _ in range(steps):
        x, y = next(stream)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        return (model(test.x).argmax(1) == test.y).float().mean().item()


def test_digits_are_learnable(digits):
    train, test, info = digits
    torch.manual_seed(0)
    accuracy = train_and_score(build_model("mlp", info.num_classes, info.in_channels), train, test, 60, 0.02)
    # Chance is 0.1; a binomial standard error at 300 images is under 0.03.
    assert accuracy > 0.8


@pytest.fixture(scope="module")
def fashion():
    return load_dataset("fashion-mnist")


def test_fashion_mnist_shapes_labels_normalisation_and_padding(fashion):
    train, test, info = fashion
    assert (info.num_classes, info.in_channels, info.image_size, info.augment) == (10, 1, 32, "none")
    assert (info.train_size, info.test_size) == (60_000, 10_000)
    assert train.x.shape == (60_000, 1, 32, 32) and test.x.shape == (10_000, 1, 32, 32)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    # Fashion-MNIST is balanced: 6,000 training and 1,000 test images per class.
    assert train.y.bincount(minlength=10).tolist() == [6000] * 10
    assert test.y.bincount(minlength=10).tolist() == [1000] * 10
    assert abs(train.x.mean().item()) < 1e-4 and abs(train.x.std().item() - 1) < 1e-4
    # The 28x28 images are zero-padded by 2 pixels: the border is the normalised value of a black pixel.
    border = torch.cat([train.x[:, :, :2].flatten(), train.x[:, :, :, -2:].flatten()])
    assert torch.equal(border, border[:1].expand_as(border)) and border[0] < train.x.mean()
    small_train, small_test, small = load_dataset("fashion-mnist", train_size=500, test_size=200)
    assert (small.train_size, small.test_size) == (500, 200) and torch.equal(small_test.y, test.y[:200])


def test_fashion_mnist_is_learnable(fashion):
    train, test, info = fashion
    torch.manual_seed(0)
    accuracy = train_and_score(build_model("mlp", info.num_classes, info.in_channels), train, test, 150, 0.01)
    # Chance is 0.1; a linear model reaches about 0.84 after an epoch; the standard error at 10,000 images
    # is under 0.005.
    assert accuracy > 0.7


def test_fashion_mnist_is_read_from_the_data_root_first_and_checked(tmp_path, monkeypatch):
    import shutil

    from atomo_core import data

    folder = tmp_path / "fashion-mnist"
    shutil.copytree(data.FASHION_MNIST_SYSTEM, folder, ignore=shutil.ignore_patterns("*.md*"))
    # A corrupt copy under the data root is read (and refused), not silently replaced by the system's.
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write((0x801).to_bytes(4, "big") + (10_000).to_bytes(4, "big") + b"\x00" * 9_999)
    with pytest.raises(DatasetUnavailableError, match=r"t10k-labels-idx1-ubyte.gz: not an idx file.*\(10000,\)"):
        load_dataset("fashion-mnist", root=tmp_path)
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write((0x801).to_bytes(4, "big") + (10_000).to_bytes(4, "big") + b"\x0b" * 10_000)
    with pytest.raises(DatasetUnavailableError, match="labels must lie in 0..9, got 11"):
        load_dataset("fashion-mnist", root=tmp_path)
    # Neither under the root nor installed: the error names both places and the Debian package.
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM", tmp_path / "nowhere")
    (folder / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(
        DatasetUnavailableError, match="in neither .*fashion-mnist nor .*nowhere.*apt-get install dataset-fashion-mnist"
    ):
        load_dataset("fashion-mnist", root=tmp_path)


def test_synthetic_is_seeded_sized_and_learnable():
    train, test, info = load_dataset("synthetic", train_size=2000, test_size=1000, seed=3)
    assert (info.num_classes, info.in_channels, info.train_size, info.test_size) == (10, 3, 2000, 1000)
    assert train.x.shape == (2000, 3, 32, 32) and test.y.shape == (1000,)
    same, _, _ = load_dataset("synthetic", train_size=2000, test_size=1000, seed=3)
    other, _, _ = load_dataset("synthetic", train_size=2000, test_size=1000, seed=4)
    assert torch.equal(train.x, same.x) and torch.equal(train.y, same.y)
    assert not torch.equal(train.x, other.x)
    torch.manual_seed(0)
    accuracy = train_and_score(build_model("mlp"), train, test, 40, 0.05)
    assert accuracy > 0.9  # chance is 0.1


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 500), num_shards=st.integers(1, 20), seed=st.integers(0, 2**32))
def test_shards_are_disjoint_and_cover(n, num_shards, seed):
    num_shards = min(num_shards, n)
    shards = [shard_indices(n, num_shards, i, seed) for i in range(num_shards)]
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert torch.equal(shards[0], shard_indices(n, num_shards, 0, seed))


def test_shards_depend_on_the_seed_and_reject_bad_arguments():
    assert not torch.equal(shard_indices(1000, 4, 1, seed=0), shard_indices(1000, 4, 1, seed=1))
    with pytest.raises(ValueError, match="num_shards must be between 1 and the data set size 3"):
        shard_indices(3, 4, 0)
    with pytest.raises(ValueError, match=r"shard_index must be in \[0, 4\)"):
        shard_indices(100, 4, 4)


def labelled_split(n):
    """A split whose label is the example's index, so batches show which examples they hold."""
    return Split(torch.randn(n, 3, 32, 32), torch.arange(n))


def test_stream_walks_its_shard_once_per_epoch_and_reshuffles():
    split = labelled_split(103)
    stream = BatchStream(split, shard_index=1, num_shards=3, batch_size=8, seed=11)
    shard = set(shard_indices(103, 3, 1, seed=11).tolist())
    assert len(shard) == 34 and stream.batches_per_epoch == 4
    epochs = []
    for _ in range(3):
        seen = torch.cat([next(stream)[1] for _ in range(stream.batches_per_epoch)])
        assert len(set(seen.tolist())) == 32 and set(seen.tolist()) <= shard
        epochs.append(seen)
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    x, y = stream.batch(0)
    assert torch.equal(x, split.x[y])


def test_streams_of_different_shards_share_no_example():
    split = labelled_split(200)
    seen = [next(BatchStream(split, i, 4, 50, seed=2))[1] for i in range(4)]
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(200))


@pytest.mark.parametrize("augment", ["none", "crop_flip"])
def test_seek_equals_iterating(augment):
    split = labelled_split(90)
    stream = BatchStream(split, 0, 2, 10, seed=4, augment=augment)
    batches = [next(stream) for _ in range(14)]  # 4 batches per epoch: crosses three epoch boundaries
    resumed = BatchStream(split, 0, 2, 10, seed=4, start_step=9, augment=augment)
    for x, y in batches[9:]:
        rx, ry = next(resumed)
        assert torch.equal(rx, x) and torch.equal(ry, y)
    stream.seek(2)
    assert stream.step == 2
    for x, y in batches[2:6]:
        sx, sy = next(stream)
        assert torch.equal(sx, x) and torch.equal(sy, y)
    different_seed = BatchStream(split, 0, 2, 10, seed=5, augment=augment)
    assert not torch.equal(next(different_seed)[1], batches[0][1])


def test_stream_rejects_bad_arguments():
    split = labelled_split(20)
    with pytest.raises(ValueError, match="batch_size must be between 1 and the shard size 10"):
        BatchStream(split, 0, 2, 11)
    with pytest.raises(ValueError, match="augment must be one of"):
        BatchStream(split, 0, 2, 5, augment="mixup")
    with pytest.raises(ValueError, match="step must be non-negative"):
        BatchStream(split, 0, 2, 5).seek(-1)


def candidate_windows(image, padding, flip):
    """Every crop of the zero-padded image (and its mirror image): [count, C, H, W]."""
    _, h, w = image.shape
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    windows = [padded[:, r : r + h, c : c + w] for r in range(2 * padding + 1) for c in range(2 * padding + 1)]
    windows += [window.flip(-1) for window in windows] if flip else []
    return torch.stack(windows)


@pytest.mark.parametrize("flip", [True, False])
def test_crop_flip_draws_every_window_uniformly(flip):
    # Distinct pixel values make every window (and mirror image) distinct, so each output names its window.
    image = torch.arange(1, 65, dtype=torch.float32).reshape(1, 8, 8)
    n = 4000
    out = random_crop_flip(image.expand(n, 1, 8, 8), torch.Generator().manual_seed(0), padding=4, flip=flip)
    candidates = candidate_windows(image, 4, flip)
    matches = (out[:, None] == candidates[None]).flatten(2).all(2)
    assert torch.equal(matches.sum(1), torch.ones(n, dtype=torch.long))
    counts = matches.sum(0)
    assert len(counts) == (162 if flip else 81)
    # Uniform over windows (and flips): a chi-square goodness-of-fit test at level 1e-4.
    assert stats.chisquare(counts.numpy()).pvalue > 1e-4


def test_crop_flip_on_three_channel_batches_keeps_shapes_and_images_apart():
    x = torch.randn(16, 3, 32, 32)
    out = random_crop_flip(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.is_contiguous()
    for i in (0, 7, 15):
        windows = candidate_windows(x[i], 4, flip=True)
        assert (windows == out[i]).flatten(1).all(1).sum() == 1
