"""Host syncs and encode time of a model's encode: the batched ATOMO path against the per-layer one.

The batched path (`LayerPolicy.encode` -> `AtomicCodec.encode_many`) runs Algorithm 1 for all layers at once
on the device and copies the sample to the host once; the per-layer path (`encode_with_state` per layer, as
`LayerPolicy.encode` did before) runs Algorithm 1 and the sampling layer by layer. Both encode the same
ResNet-18 gradients (one CIFAR-shaped batch; `build_model("resnet18", 10, 3)`), 1-D tensors dense.

- syncs: calls that force a host synchronization when the tensor is on a GPU, counted by patching them in
  this process only (`SyncCounter`): Tensor.item / __bool__ / __int__ / __float__ / __index__ / tolist /
  cpu, a blocking Tensor.to onto another device, torch.nonzero and Tensor.nonzero, masked_select, and indexing
  with a boolean mask (a nonzero inside), and torch.linalg.eigh (it checks its solver's status on the host
  on CUDA). On this CPU each is counted where it runs, also in a branch that runs only off CUDA (the svd
  exact route's per-layer fp32 eigensolver and its finiteness check; on CUDA the batched path solves those
  eigenproblems with one eigh per matrix size); other calls inside C++ operators, and copies that only
  cross devices on a GPU (a blocking `.to(tensor.device)` of a host constant), are not seen. --sites prints
  where each call came from.
- --cuda-route: the svd exact route's Gram matrices take the route they take on CUDA (a batched float64 eigh
  per matrix size, `spectral.batched_exact_route`) here too, so that the counts are a GPU's.
- --device cuda: the gradients, the encoders and their generators on the GPU (the exact route then takes
  its CUDA route by itself), each timing ending with a device synchronization.
- encode ms: median wall time of the whole model's encode over --repeats; "ratio" is batched / per-layer.

    python bench/syncs.py [--batch 8] [--repeats 5] [--threads 2] [--sites] [--cuda-route] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys

import torch
from timing import median_time

from atomo_core import LayerPolicy, dense_nbytes, make_codec
from atomo_core.codecs import decode
from atomo_core.decompositions import spectral
from atomo_core.models import build_model

CONFIGS = {
    "svd s=3 exact": ("svd", {"budget": 3}),
    "svd s=3 warm": ("svd", {"budget": 3, "basis": "warm"}),
    "entrywise s=300": ("entrywise", {"budget": 300}),
    "fourier s=300": ("fourier", {"budget": 300}),
}
_METHODS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "cpu", "nonzero", "masked_select")


class SyncCounter(contextlib.AbstractContextManager):
    """Counts, while entered, the calls that would make the host wait for a GPU (see the module docstring).

    `total` is their number; `sites` counts them by (call, caller's file:function).
    """

    def __init__(self):
        self.sites: collections.Counter = collections.Counter()
        self._saved: list[tuple[object, str, object]] = []

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def _count(self, what: str) -> None:
        frame = sys._getframe(2)
        self.sites[(what, f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_code.co_name}")] += 1

    def _patch(self, owner, name: str, wrapper) -> None:
        original = getattr(owner, name)
        self._saved.append((owner, name, original))
        setattr(owner, name, wrapper(original))

    def __enter__(self):
        for name in _METHODS:
            self._patch(torch.Tensor, name, self._always(name))
        self._patch(torch, "nonzero", self._always("torch.nonzero"))
        self._patch(torch, "masked_select", self._always("torch.masked_select"))
        self._patch(torch.linalg, "eigh", self._always("linalg.eigh"))
        self._patch(torch.Tensor, "__getitem__", self._masked("getitem"))
        self._patch(torch.Tensor, "__setitem__", self._masked("setitem"))
        self._patch(torch.Tensor, "to", self._to_host())
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()
        return False

    def _always(self, what):
        def wrapper(original):
            def counted(*args, **kwargs):
                self._count(what)
                return original(*args, **kwargs)

            return counted

        return wrapper

    def _masked(self, what):
        def is_mask(index) -> bool:
            items = index if isinstance(index, tuple) else (index,)
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim() > 0 for i in items)

        def wrapper(original):
            def counted(tensor, index, *rest):
                if is_mask(index):
                    self._count(f"{what}[mask]")
                return original(tensor, index, *rest)

            return counted

        return wrapper

    def _to_host(self):
        def wrapper(original):
            def counted(tensor, *args, **kwargs):
                target = kwargs.get("device", args[0] if args else None)
                moved = isinstance(target, (str, torch.device)) and torch.device(target) != tensor.device
                if moved and not kwargs.get("non_blocking", False):
                    self._count("to(other device)")
                return original(tensor, *args, **kwargs)

            return counted

        return wrapper


def per_layer_encode(policy: LayerPolicy, tensors, generator) -> list:
    """`LayerPolicy.encode` as it was before the batched path: `encode_with_state` layer by layer."""
    messages = []
    for tensor in tensors:
        codec = policy.codec_for_shape(tuple(tensor.shape))
        msg, _ = codec.encode_with_state(tensor, None, generator)
        if len(msg) > dense_nbytes(tuple(tensor.shape)):
            msg = policy._dense.encode(decode(bytes(msg)).to(tensor.dtype))
        messages.append(msg)
    return messages


def resnet18_gradients(batch: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("resnet18", 10, 3)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sites", action="store_true", help="print where each counted call came from")
    parser.add_argument("--cuda-route", action="store_true", help="the svd exact route's CUDA eigensolver route")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if args.cuda_route:
        spectral.batched_exact_route = lambda y: True
    torch.set_num_threads(args.threads)
    grads = [g.to(device) for g in resnet18_gradients(args.batch)]
    atomic = sum(g.dim() >= 2 for g in grads)
    entries = sum(g.numel() for g in grads)
    print(f"ResNet-18 on {args.device}: {len(grads)} tensors, {atomic} encoded by the codec, {entries} entries")
    header = f"{'syncs per-layer':>16}{'syncs batched':>14}{'ms per-layer':>14}{'ms batched':>12}{'ratio':>7}"
    print(f"{'codec':<18}{header}")
    for label, (name, params) in CONFIGS.items():
        row = {}
        for path in ("per-layer", "batched"):
            policy = LayerPolicy(make_codec(name, **params), batched=True)

            def run(policy=policy, path=path):
                generator = torch.Generator(device).manual_seed(0)
                messages = (
                    policy.encode(grads, generator) if path == "batched" else per_layer_encode(policy, grads, generator)
                )
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                return messages

            run()  # warm-up (and, for the warm basis, nothing kept: the state stays empty in both paths)
            policy.reset_feedback()
            with SyncCounter() as counter:
                run()
            policy.reset_feedback()
            seconds = median_time(lambda run=run, policy=policy: (run(), policy.reset_feedback()), args.repeats)
            row[path] = (counter, seconds)
        (before, t0), (after, t1) = row["per-layer"], row["batched"]
        print(f"{label:<18}{before.total:>16}{after.total:>14}{1e3 * t0:>14.1f}{1e3 * t1:>12.1f}{t1 / t0:>7.2f}")
        if args.sites:
            for path, (counter, _) in row.items():
                for (what, site), count in sorted(counter.sites.items(), key=lambda kv: -kv[1]):
                    print(f"    {path:<10} {count:>4} x {what:<16} {site}")


if __name__ == "__main__":
    main()
