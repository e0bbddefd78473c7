"""Data sets as in-memory tensors, disjoint per-worker shards and a resumable batch stream.

Section 2 (and Section 6's experiments): each of the n workers draws its mini-batches from its own partition
of the training data, computes a stochastic gradient, and the parameter server averages the workers'
(sparsified) gradients. `shard_indices` gives the partition; `BatchStream` draws one worker's batches.

Data sets (`load_dataset(name)`):
- "digits": scikit-learn's handwritten digits (1,797 8x8 images shipped with scikit-learn, 10 classes),
  upsampled to 1x32x32, with a fixed stratified split of 1,497 training and 300 test images. No download.
- "fashion-mnist": Zalando's Fashion-MNIST (60,000 training and 10,000 test 28x28 grey images of clothing, 10
  classes), zero-padded to 1x32x32, read offline from the idx files that Debian's `dataset-fashion-mnist`
  package installs in /usr/share/datasets/fashion-mnist (or from `root`/fashion-mnist first). No download.
- "synthetic": 3x32x32 images of 10 classes, a smooth class-dependent mean image plus Gaussian noise;
  seeded and sized by the caller, for speed tests.
- "cifar10", "cifar100", "svhn", "mnist": through torchvision (the `vision` extra, `pip install -e '.[vision]'`;
  `torchvision_problem()` says why it does not import), found or downloaded under `root`; MNIST is
  zero-padded to 32x32.
Images are float32, normalised per channel to zero mean and unit variance with training-set statistics.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.nn import functional as F

DATASETS = ("digits", "fashion-mnist", "synthetic", "cifar10", "cifar100", "svhn", "mnist")
VISION = ("cifar10", "cifar100", "svhn", "mnist")
VISION_INSTALL = (
    "install the vision extra: pip install -e '.[vision]' in the atomo source folder; torchvision must be built "
    "for the installed torch (for a CPU torch: pip install torchvision --index-url https://download.pytorch.org/whl/cpu)"
)
DEFAULT_ROOT = Path("~/.cache/atomo/data").expanduser()
FASHION_MNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist package
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60_000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10_000),
}
FASHION_MNIST_INSTALL = "install Debian's package: apt-get install dataset-fashion-mnist"
IMAGE_SIZE = 32
DIGITS_TEST_SIZE = 300
SYNTHETIC_SIZES = (5_000, 1_000)
SYNTHETIC_MAX_SIZE = 100_000
SYNTHETIC_SIGNAL = 0.2

Augment = Literal["none", "crop", "crop_flip"]
AUGMENTS = ("none", "crop", "crop_flip")

# Purposes that lead every derived seed, so that the partition, the epoch orders, the augmentations and the
# synthetic data drawn from one user seed are independent streams. Each purpose has a fixed number of keys:
# SeedSequence pads with zeros, so keys of different lengths could otherwise collide.
_PARTITION, _EPOCH_ORDER, _AUGMENT, _SYNTHETIC = range(4)


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """Images `x` [N, C, 32, 32] float32 (normalised) and labels `y` [N] int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.y.shape[0]

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device), self.y.to(device))


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and a training loop need to know about a data set.

    `augment` is the training augmentation suited to the data set: "crop_flip" for CIFAR (random crop with
    padding 4 and horizontal flip), "crop" for SVHN (flipping digits changes them), "none" otherwise.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    train_size: int
    test_size: int
    augment: Augment


class DatasetUnavailableError(RuntimeError):
    """A data set that is neither under `root` nor downloadable (nor, for fashion-mnist, installed)."""


def load_dataset(
    name: str,
    root: str | Path | None = None,
    *,
    download: bool = True,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
) -> tuple[Split, Split, DatasetInfo]:
    """Load data set `name` into memory: (train, test, info).

    `root`: where torchvision data sets are found or downloaded (default ~/.cache/atomo/data); fashion-mnist is
    read from `root`/fashion-mnist when its files are there, else from Debian's package (FASHION_MNIST_SYSTEM).
    `train_size`, `test_size`: the synthetic set's sizes (default 5,000 and 1,000); for the other sets, keep
    only the first examples of each split (a quick subset). `seed`: the synthetic set's seed (the digits
    split is fixed, so every run evaluates on the same 300 images).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    for label, size in (("train_size", train_size), ("test_size", test_size)):
        if size is not None and size < 1:
            raise ValueError(f"{label} must be positive, got {size}")
        if size is not None and name == "synthetic" and size > SYNTHETIC_MAX_SIZE:
            raise ValueError(f"{label} of the synthetic set must be at most {SYNTHETIC_MAX_SIZE}, got {size}")
    if name == "digits":
        train, test = _digits()
    elif name == "fashion-mnist":
        train, test = _fashion_mnist(Path(root).expanduser() if root is not None else DEFAULT_ROOT)
    elif name == "synthetic":
        train, test = _synthetic(train_size or SYNTHETIC_SIZES[0], test_size or SYNTHETIC_SIZES[1], seed)
    else:
        train, test = _vision(name, Path(root).expanduser() if root is not None else DEFAULT_ROOT, download)
    if name != "synthetic":
        train = Split(train.x[:train_size], train.y[:train_size]) if train_size else train
        test = Split(test.x[:test_size], test.y[:test_size]) if test_size else test
    info = DatasetInfo(
        name=name,
        num_classes={"cifar100": 100}.get(name, 10),
        in_channels=train.x.shape[1],
        image_size=IMAGE_SIZE,
        train_size=len(train),
        test_size=len(test),
        augment={"cifar10": "crop_flip", "cifar100": "crop_flip", "svhn": "crop"}.get(name, "none"),
    )
    return train, test, info


def _normalized(train_x: torch.Tensor, test_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel zero mean and unit variance, with the training set's statistics for both splits (in place:
    the callers pass tensors of their own)."""
    mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
    std = train_x.std(dim=(0, 2, 3), keepdim=True)
    return train_x.sub_(mean).div_(std), test_x.sub_(mean).div_(std)


def _digits() -> tuple[Split, Split]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1)
    images = F.interpolate(images, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    labels = torch.from_numpy(digits.target).long()
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_SIZE, stratify=digits.target, random_state=0
    )
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    train_x, test_x = _normalized(images[train_idx], images[test_idx])
    return Split(train_x, labels[train_idx]), Split(test_x, labels[test_idx])


def _fashion_mnist(root: Path) -> tuple[Split, Split]:
    """Fashion-MNIST from its four gzipped idx files in `root`/fashion-mnist, else where Debian installs them."""
    names = [f for images, labels, _ in FASHION_MNIST_FILES.values() for f in (images, labels)]
    folders = (root / "fashion-mnist", FASHION_MNIST_SYSTEM)
    folder = next((d for d in folders if all((d / f).is_file() for f in names)), None)
    if folder is None:
        raise DatasetUnavailableError(
            f"data set 'fashion-mnist' is in neither {folders[0]} nor {folders[1]} (its files: {', '.join(names)}); "
            f"{FASHION_MNIST_INSTALL}"
        )
    splits = []
    for images_file, labels_file, count in FASHION_MNIST_FILES.values():
        images = _read_idx(folder / images_file, (count, 28, 28))
        labels = _read_idx(folder / labels_file, (count,))
        if int(labels.max()) > 9:
            raise DatasetUnavailableError(f"{folder / labels_file}: labels must lie in 0..9, got {int(labels.max())}")
        splits.append((F.pad(images.unsqueeze(1), (2, 2, 2, 2)), labels.long()))
    train_x, test_x = _normalized(*(x.float().div_(255) for x, _ in splits))
    return Split(train_x, splits[0][1]), Split(test_x, splits[1][1])


def _read_idx(path: Path, shape: tuple[int, ...]) -> torch.Tensor:
    """An unsigned-byte idx file (gzipped) of exactly `shape`: magic 0x0000080<ndim>, big-endian sizes, data."""
    import gzip

    with gzip.open(path, "rb") as f:
        data = f.read()
    header = 4 + 4 * len(shape)
    magic = int.from_bytes(data[:4], "big")
    sizes = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(len(shape)))
    if magic != 0x800 + len(shape) or sizes != shape or len(data) != header + int(np.prod(shape)):
        raise DatasetUnavailableError(
            f"{path}: not an idx file of unsigned bytes with shape {shape} (magic {magic:#x}, sizes {sizes}, "
            f"{len(data)} bytes)"
        )
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


def _synthetic(train_size: int, test_size: int, seed: int, num_classes: int = 10) -> tuple[Split, Split]:
    """Class c's images are SYNTHETIC_SIGNAL * mean_c + N(0, 1) noise, mean_c a smooth random 3x32x32 image."""
    generator = _generator(_SYNTHETIC, seed)
    coarse = torch.randn(num_classes, 3, 4, 4, generator=generator)
    means = F.interpolate(coarse, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    n = train_size + test_size
    labels = torch.randint(num_classes, (n,), generator=generator)
    images = SYNTHETIC_SIGNAL * means[labels] + torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return Split(images[:train_size], labels[:train_size]), Split(images[train_size:], labels[train_size:])


@functools.cache
def torchvision_problem() -> str | None:
    """Why torchvision cannot be used in this process ('ModuleNotFoundError: ...'), or None when it imports.

    A torchvision built for another torch fails on import with a RuntimeError or an OSError (a missing
    operator or library), not only ImportError, so any exception counts. Tried once per process.
    """
    try:
        import torchvision  # noqa: F401
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def vision_unavailable_message(name: str) -> str | None:
    """For a torchvision data set `name` where torchvision does not import: the error a user sees (what is
    missing and how to install it); else None."""
    problem = torchvision_problem() if name in VISION else None
    return (
        None
        if problem is None
        else f"{name} needs torchvision, which does not import here ({problem}); {VISION_INSTALL}"
    )


def _vision(name: str, root: Path, download: bool) -> tuple[Split, Split]:
    message = vision_unavailable_message(name)
    if message is not None:
        raise ImportError(f"data set {message}")
    from torchvision import datasets

    try:
        if name == "svhn":
            train, test = (datasets.SVHN(root, split=s, download=download) for s in ("train", "test"))
            images = [torch.from_numpy(d.data) for d in (train, test)]
            labels = [torch.from_numpy(d.labels) for d in (train, test)]
        else:
            cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100, "mnist": datasets.MNIST}[name]
            train, test = (cls(root, train=t, download=download) for t in (True, False))
            labels = [torch.as_tensor(d.targets) for d in (train, test)]
            if name == "mnist":
                images = [F.pad(d.data.unsqueeze(1), (2, 2, 2, 2)) for d in (train, test)]
            else:
                images = [torch.from_numpy(d.data).permute(0, 3, 1, 2) for d in (train, test)]
    except (RuntimeError, OSError) as e:
        how = "downloading failed" if download else "download=False"
        raise DatasetUnavailableError(f"data set {name!r} is not under {root} and {how}: {e}") from e
    train_x, test_x = _normalized(*(x.float().div_(255) for x in images))
    return Split(train_x, labels[0].long()), Split(test_x, labels[1].long())


def _generator(purpose: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded from (purpose, *keys), non-negative integers mixed by numpy's SeedSequence."""
    state = np.random.SeedSequence([purpose, *(int(k) for k in keys)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def shard_indices(n: int, num_shards: int, shard_index: int, seed: int = 0) -> torch.Tensor:
    """Worker `shard_index`'s part of range(n): a seeded permutation cut into `num_shards` near-equal parts.

    The parts are disjoint and cover range(n); every worker computes the same permutation from `seed`.
    """
    if not 1 <= num_shards <= n:
        raise ValueError(f"num_shards must be between 1 and the data set size {n}, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
    permutation = torch.randperm(n, generator=_generator(_PARTITION, seed))
    return torch.tensor_split(permutation, num_shards)[shard_index]


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4, flip: bool = True):
    """Random crop of the zero-padded images and (if `flip`) horizontal flip with probability 1/2, per image.

    Vectorised over the batch: one gather of each image's window from its flattened padded image. Zero
    padding is the channel mean, as the images are normalised.
    """
    n, channels, height, width = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = torch.randint(2 * padding + 1, (n, 1), generator=generator) + torch.arange(height)
    cols = torch.randint(2 * padding + 1, (n, 1), generator=generator) + torch.arange(width)
    if flip:
        cols = torch.where(torch.rand(n, 1, generator=generator) < 0.5, cols.flip(1), cols)
    window = (rows[:, :, None] * padded.shape[-1] + cols[:, None, :]).flatten(1).to(x.device)
    pixels = padded.flatten(2).gather(2, window[:, None, :].expand(n, channels, height * width))
    return pixels.view(n, channels, height, width)


class BatchStream:
    """One worker's endless stream of (x, y) mini-batches from its shard of `split`.

    Epoch e visits the shard in an order drawn from (seed, shard_index, e); each epoch yields
    len(shard) // batch_size batches (the remainder is left out, a different one each epoch). Batch `step`
    is a pure function of (seed, shard_index, num_shards, batch_size, step), so `seek(step)` resumes a
    run from a checkpoint exactly. `augment` applies `random_crop_flip` with a generator drawn from
    (seed, shard_index, step).
    """

    def __init__(
        self,
        split: Split,
        shard_index: int,
        num_shards: int,
        batch_size: int,
        seed: int = 0,
        start_step: int = 0,
        augment: Augment = "none",
    ):
        if augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
        self.split = split
        self.shard_index = shard_index
        self.seed = seed
        self.augment = augment
        self.shard = shard_indices(len(split), num_shards, shard_index, seed)
        if not 1 <= batch_size <= len(self.shard):
            raise ValueError(f"batch_size must be between 1 and the shard size {len(self.shard)}, got {batch_size}")
        self.batch_size = batch_size
        self.batches_per_epoch = len(self.shard) // batch_size
        self._epoch = -1
        self._order = self.shard
        self.seek(start_step)

    def seek(self, step: int) -> None:
        """Make `step` the next batch to yield."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        self.step = step

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number `step` of this stream (random access)."""
        epoch, k = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            order = torch.randperm(
                len(self.shard), generator=_generator(_EPOCH_ORDER, self.seed, self.shard_index, epoch)
            )
            self._epoch, self._order = epoch, self.shard[order]
        index = self._order[k * self.batch_size : (k + 1) * self.batch_size].to(self.split.y.device)
        x, y = self.split.x[index], self.split.y[index]
        if self.augment != "none":
            generator = _generator(_AUGMENT, self.seed, self.shard_index, step)
            x = random_crop_flip(x, generator, flip=self.augment == "crop_flip")
        return x, y

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.batch(self.step)
        self.step += 1
        return batch
