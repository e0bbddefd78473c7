"""The two halves of an ATOMO codec: an atomic decomposition, and the sampler that sparsifies it.

A decomposition writes a tensor g as sum_i lam_i a_i with unit-norm atoms a_i (Section 2, eq. (1)) and
knows how to put a few weighted atoms on the wire and rebuild their sum. `AtomicCodec` adds the rest of
ATOMO, the same for every decomposition: Algorithm 1 probabilities p (problem (3)), independent
t_i ~ Bernoulli(p_i), and the estimate g^ = sum_i (t_i / p_i) lam_i a_i of eq. (2), which is unbiased, with
E||g^||^2 = sum_i lam_i^2 / p_i when the atoms are orthonormal (Lemma 1, Theorem 4).

`AtomicCodec.encode_many` encodes many layers (a model's, through `LayerPolicy`) with Algorithm 1 and the
sampling batched over all of them: one host synchronization per model.

To add a decomposition, subclass `AtomicDecomposition` and register an `AtomicCodec` subclass that names
it (see docs/custom-decomposition.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from atomo_core.codecs import Codec
from atomo_core.probabilities import (
    SegmentLayout,
    atomic_probabilities,
    check_budget,
    finish_probabilities,
    flat_dtype,
    layer_probabilities,
    segment_probabilities,
)
from atomo_core.sampling import bernoulli_sample, sample_segments
from atomo_core.wire import DEFAULT_LIMITS, DTYPE_CODES, Message, WireFormatError, WireLimits

ATOM_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class AtomicDecomposition(ABC):
    """g = sum_i lam_i a_i with unit-norm atoms (eq. (1)), and the wire form of a few weighted atoms.

    Options that change the wire form are returned by `wire_params` and read back by `from_wire_params`
    (floats in the message header). Decoding must validate every section it reads.
    """

    def wire_params(self) -> tuple[float, ...]:
        return ()

    @classmethod
    def from_wire_params(cls, params: tuple[float, ...]) -> AtomicDecomposition:
        if params:
            raise WireFormatError(f"{cls.__name__}: expected no decomposition parameters, got {len(params)}")
        return cls()

    @abstractmethod
    def decompose(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The coefficients lam (1-D, one per atom) and a state from which `pack` reads atoms."""

    def decompose_with_state(
        self, tensor: torch.Tensor, state: Any, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, Any, Any]:
        """`decompose` for a decomposition that carries encoder state from step to step (the warm spectral
        basis): (lam, the state `pack` reads, the state for the next step). `state` None is the first step;
        the generator is the encoder's (the same one then draws the sample). Stateless by default."""
        lam, decomposition = self.decompose(tensor)
        return lam, decomposition, None

    def decompose_many(
        self, tensors: Sequence[torch.Tensor], states: Sequence[Any], generator: torch.Generator | None
    ) -> list[tuple[torch.Tensor, Any, Any]]:
        """`decompose_with_state` for each of a model's tensors, in order (the batched encode's step (1)):
        override to share work across layers (the spectral one batches its small eigenproblems)."""
        return [self.decompose_with_state(t, st, generator) for t, st in zip(tensors, states, strict=True)]

    @abstractmethod
    def pack(self, state: Any, index: torch.Tensor, lam: torch.Tensor, p: torch.Tensor) -> list[torch.Tensor]:
        """Sections that carry sum_k (lam_k / p_k) a_{index_k}: the selected atoms with their weights (eq. (2)).

        `index` lists the selected atoms (ascending), `lam` and `p` their coefficients and probabilities.
        """

    def pack_selected(
        self,
        state: Any,
        index: torch.Tensor,
        lam: torch.Tensor,
        p: torch.Tensor,
        host_index: np.ndarray,
        host_lam: np.ndarray,
        host_p: np.ndarray,
    ) -> list[torch.Tensor]:
        """`pack` in a batched encode (`AtomicCodec.encode_many`), which also holds the selected indices
        (int64), coefficients and probabilities (float64) on the host, from its one copy: override to read
        counts (or whole small sections) there instead of synchronizing with the device. Default: `pack`."""
        return self.pack(state, index, lam, p)

    @abstractmethod
    def unpack(self, sections: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        """Validate the sections and rebuild the estimate (float32 or float64) with the tensor's `shape`.

        Raise WireFormatError for anything inconsistent with `shape` and this decomposition's options.
        """

    def unpack_add_(self, sections: list[torch.Tensor], out: torch.Tensor, alpha: float) -> torch.Tensor:
        """out += alpha * unpack(...): override where the estimate can be added without materializing it."""
        return out.add_(self.unpack(sections, tuple(out.shape)).to(device=out.device, dtype=out.dtype), alpha=alpha)

    def expected_sections(self, shape: tuple[int, ...], atoms: float) -> list[torch.Tensor] | None:
        """Meta tensors with the sections' sizes when about `atoms` atoms are selected; None if unknown."""
        return None


class AtomicCodec(Codec):
    """ATOMO over the decomposition `decomposition_type`: Algorithm 1, Bernoulli sampling, eq. (2).

    `budget` is the sparsity budget s of problem (3): the expected number of atoms sent. Other keyword
    options go to the decomposition. The header carries (budget, *decomposition.wire_params()).
    """

    decomposition_type: ClassVar[type[AtomicDecomposition]]

    def __init__(self, budget: float, **options):
        self.budget = check_budget(budget)
        self.decomposition = self.decomposition_type(**options)

    def encode(self, tensor: torch.Tensor, generator: torch.Generator | None = None) -> Message:
        return self.encode_with_state(tensor, None, generator)[0]

    def encode_with_state(
        self, tensor: torch.Tensor, state: Any, generator: torch.Generator | None = None
    ) -> tuple[Message, Any]:
        """The message and the encoder state for the next step (None for a stateless decomposition)."""
        lam, decomposition, state = self.decomposition.decompose_with_state(tensor.detach(), state, generator)  # (1)
        p = atomic_probabilities(lam, self.budget)  # Algorithm 1, problem (3)
        index = bernoulli_sample(p, generator)  # t_i ~ Bernoulli(p_i)
        sections = self.decomposition.pack(decomposition, index, lam[index], p[index])  # eq. (2)
        return self._message(tensor, sections), state

    def encode_many(
        self,
        tensors: Sequence[torch.Tensor],
        states: Sequence[Any] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[list[Message], list[Any]]:
        """Encode many tensors (a model's layers) at once: the messages and each one's next encoder state.

        The tensors are decomposed (eq. (1), `decompose_many`: kernel launches, with no host sync in the
        built-in decompositions' hot path but the spectral one's batched eigensolver calls, one per matrix
        size), then Algorithm 1 runs for all layers at once on the device (`segment_probabilities`), one
        uniform draw samples them all and ONE copy to the host brings back the sample with the finiteness and
        convergence flags (`sample_segments`); each layer is then packed (`pack_selected`, eq. (2)). The
        estimate of each layer has the same law as `encode_with_state`'s (the random stream differs: one draw
        for all layers). Non-finite coefficients raise ValueError; a layer whose Newton iteration did not
        reach its fixed point (budgets above 17 with long geometric tails of coefficients) is finished by
        `atomic_probabilities` and resampled with the same uniforms (a few more
        host syncs, only then). Tensors on several devices are encoded one by one (`encode_with_state`).
        """
        states = [None] * len(tensors) if states is None else list(states)
        if len(states) != len(tensors):
            raise ValueError(f"{len(states)} encoder states for {len(tensors)} tensors")
        if len({t.device for t in tensors}) > 1:
            pairs = [self.encode_with_state(t, st, generator) for t, st in zip(tensors, states, strict=True)]
            return [m for m, _ in pairs], [st for _, st in pairs]
        decomposed = self.decomposition.decompose_many([t.detach() for t in tensors], states, generator)  # (1)
        lams = [lam for lam, _, _ in decomposed]
        for lam in lams:
            if lam.dim() != 1 or not lam.is_floating_point():
                raise ValueError(f"coefficients must be 1-D floating point, got shape {tuple(lam.shape)} {lam.dtype}")
        layout = SegmentLayout([lam.numel() for lam in lams])
        budgets = [self.budget] * len(lams)
        flat = layout.flatten(lams, flat_dtype(lams))
        flat_p, flags = segment_probabilities(flat, layout, budgets)  # Algorithm 1, problem (3)
        sample = sample_segments(flat_p, flat, layout, budgets, generator, flags)  # t_i ~ Bernoulli(p_i)
        p = layer_probabilities(flat_p, layout, lams)
        for layer in finish_probabilities(p, lams, budgets, sample.extra):
            uniforms = layout.split(sample.uniforms)[layer]
            index = torch.nonzero(uniforms < p[layer]).reshape(-1)
            sample.index[layer] = index
            sample.host_index[layer] = index.cpu().numpy()
            sample.host_lam[layer] = lams[layer][index].to(torch.float64).cpu().numpy()
            sample.host_p[layer] = p[layer][index].to(torch.float64).cpu().numpy()
        messages = []
        for layer, (tensor, (lam, decomposition, _)) in enumerate(zip(tensors, decomposed, strict=True)):
            index = sample.index[layer]
            sections = self.decomposition.pack_selected(  # eq. (2)
                decomposition,
                index,
                lam[index],
                p[layer][index],
                sample.host_index[layer],
                sample.host_lam[layer],
                sample.host_p[layer],
            )
            messages.append(self._message(tensor, sections))
        return messages, [state for _, _, state in decomposed]

    def wire_params(self) -> tuple[float, ...]:
        return (self.budget, *self.decomposition.wire_params())

    @classmethod
    def from_wire_params(cls, params: tuple[float, ...]) -> AtomicCodec:
        if not params:
            raise WireFormatError(f"{cls.name}: missing the sparsity budget parameter")
        codec = cls.__new__(cls)
        try:
            codec.budget = check_budget(params[0])
        except ValueError as exc:
            raise WireFormatError(f"{cls.name}: {exc}") from exc
        codec.decomposition = cls.decomposition_type.from_wire_params(tuple(params[1:]))
        return codec

    def decode_message(self, msg: Message) -> torch.Tensor:
        return self.decomposition.unpack(msg.sections, msg.shape).to(msg.dtype)

    def decode_add_(self, data, out: torch.Tensor, alpha: float = 1.0, limits: WireLimits = DEFAULT_LIMITS):
        msg = self.parse(data, limits, out)
        return self.decomposition.unpack_add_(msg.sections, out, alpha)

    def expected_nbytes(self, shape: tuple[int, ...]) -> int | None:
        sections = self.decomposition.expected_sections(tuple(shape), self.budget)
        if sections is None:
            return None
        return len(Message(self.codec_id, tuple(shape), torch.float32, self.wire_params(), sections))


def atom_dtype_code(name: str) -> float:
    """The header code of an `atom_dtype` option ("float32" or "float16")."""
    if name not in ATOM_DTYPES:
        raise ValueError(f"atom_dtype must be one of {sorted(ATOM_DTYPES)}, got {name!r}")
    return float(DTYPE_CODES[ATOM_DTYPES[name]])


def atom_dtype_name(code: float) -> str:
    """The `atom_dtype` option written as `code` in a header; WireFormatError for anything else."""
    for name, dtype in ATOM_DTYPES.items():
        if code == DTYPE_CODES[dtype]:
            return name
    raise WireFormatError(f"unknown atom dtype code {code}")


def check_finite(values: torch.Tensor, what: str) -> None:
    """WireFormatError unless every received value is finite."""
    if values.numel() and not bool(torch.isfinite(values).all()):
        raise WireFormatError(f"{what} contain non-finite values")


def check_increasing_indices(index: torch.Tensor, n: int, what: str) -> None:
    """WireFormatError unless the received `index` is strictly increasing within [0, n) (then its first and
    last entries bound it)."""
    if not index.numel():
        return
    if int(index[0]) < 0 or int(index[-1]) >= n:
        raise WireFormatError(f"{what} must lie in [0, {n}), got {int(index[0])}..{int(index[-1])}")
    if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
        raise WireFormatError(f"{what} must be strictly increasing")


def section_counts(sections: list[torch.Tensor], dtypes: list[torch.dtype], codec: str) -> list[int]:
    """Check the number and dtypes of sections; return their element counts."""
    got = [s.dtype for s in sections]
    if got != dtypes:
        raise WireFormatError(f"{codec}: section dtypes {got} do not match the expected {dtypes}")
    return [s.numel() for s in sections]


def meta(count: float, dtype: torch.dtype) -> torch.Tensor:
    """A meta tensor of about `count` elements: sizes a section without allocating it."""
    return torch.empty(max(0, round(count)), dtype=dtype, device="meta")
