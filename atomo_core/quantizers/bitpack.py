"""Fixed-width bit fields packed and unpacked with torch ops on the tensor's own device (CPU or GPU).

`pack_bits(words, width)` writes each word in `width` bits, most significant bit first, the fields back to
back, into ceil(n * width / 8) bytes whose last byte is zero-padded: the same bytes as numpy's
`packbits` of the concatenated fields. Each call is a fixed handful of elementwise kernels (expand each word
into its bits, then sum each group of eight weighted bits into a byte) and no host synchronization: nothing
is copied to or read back from the host.
"""

from __future__ import annotations

import torch

MAX_WIDTH = 31  # the fields are shifted in int32


def _shifts(width: int, device: torch.device) -> torch.Tensor:
    return torch.arange(width - 1, -1, -1, dtype=torch.int32, device=device)


def pack_bits(words: torch.Tensor, width: int) -> torch.Tensor:
    """uint8 bytes of the non-negative integers `words` (each < 2**width), `width` bits each, MSB first."""
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"bit fields of width {width} are not in 1..{MAX_WIDTH}")
    bits = ((words.reshape(-1, 1).to(torch.int32) >> _shifts(width, words.device)) & 1).to(torch.uint8)
    bits = torch.nn.functional.pad(bits.reshape(-1), (0, -bits.numel() % 8)).view(-1, 8)
    return (bits << _shifts(8, words.device).to(torch.uint8)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(data: torch.Tensor, count: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the `count` int32 fields of `width` bits at the start of the bytes `data`, whether any later bit is set).

    The caller checks that `data` holds exactly ceil(count * width / 8) bytes; the second value is a 0-dim
    bool tensor on `data`'s device (a nonzero padding bit), so that checking it costs no separate sync.
    """
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"bit fields of width {width} are not in 1..{MAX_WIDTH}")
    bits = ((data.reshape(-1, 1) >> _shifts(8, data.device).to(torch.uint8)) & 1).reshape(-1)
    fields = bits[: count * width].view(count, width).to(torch.int32) << _shifts(width, data.device)
    return fields.sum(dim=1, dtype=torch.int32), bits[count * width :].any()


# The `coding` option of the bit-coded quantizers ---------------------------------------------------------

CODINGS = ("auto", "elias", "fixed")


def check_coding(codec: str, coding: str) -> str:
    """`coding` if it is one of CODINGS, else ValueError naming the codec."""
    if coding not in CODINGS:
        raise ValueError(f"{codec}: coding must be one of {', '.join(CODINGS)}, got {coding!r}")
    return coding


def uses_fixed(coding: str, device: torch.device) -> bool:
    """Whether a tensor on `device` is packed in fixed-width fields there: "fixed", or "auto" off the CPU."""
    return coding == "fixed" or (coding == "auto" and device.type != "cpu")


def raise_first(checks: list[tuple[torch.Tensor, str]], error: type[Exception]) -> None:
    """Raise `error(message)` for the first check whose 0-dim bool tensor is true: one host sync for all."""
    if checks:
        failed = torch.stack([flag.reshape(()) for flag, _ in checks]).tolist()
        for flag, (_, message) in zip(failed, checks, strict=True):
            if flag:
                raise error(message)
