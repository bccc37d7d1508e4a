"""Order-independent randomness: uniform draws seeded by (seed, tensor name, model index, block).

Draws are generated in fixed blocks of ``BLOCK`` elements of the flattened tensor, each block from
its own ``torch.Generator``, so a row-chunk of a tensor gets exactly the slice of the draws the
whole tensor would get, whatever the tensor order, thread count or chunking.
"""

from __future__ import annotations

import hashlib

import torch

BLOCK = 1 << 20


def block_seed(seed: int, name: str, model: int, block: int) -> int:
    h = hashlib.blake2b(f"{seed}\x1f{name}\x1f{model}\x1f{block}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def uniform(seed: int, name: str, model: int, offset: int, numel: int, full_numel: int) -> torch.Tensor:
    """float32 U[0,1) draws for flat elements ``[offset, offset + numel)`` of tensor ``name``.

    Block ``b`` always holds ``min(BLOCK, full_numel - b * BLOCK)`` draws, so the values depend only
    on the tensor, never on how it is chunked.
    """
    if offset < 0 or offset + numel > full_numel:
        raise ValueError(
            f"draws [{offset}, {offset + numel}) outside tensor {name!r} of {full_numel} elements"
        )
    out = torch.empty(numel, dtype=torch.float32)
    if numel == 0:
        return out
    first, last = offset // BLOCK, (offset + numel - 1) // BLOCK
    g = torch.Generator(device="cpu")
    pos = 0
    for b in range(first, last + 1):
        g.manual_seed(block_seed(seed, name, model, b))
        lo = max(offset, b * BLOCK) - b * BLOCK
        hi = min(offset + numel, (b + 1) * BLOCK) - b * BLOCK
        size = min(BLOCK, full_numel - b * BLOCK)
        if lo == 0 and hi == size:  # the whole block: draw straight into place (the same values)
            torch.rand(size, generator=g, dtype=torch.float32, out=out[pos : pos + size])
        else:
            out[pos : pos + hi - lo] = torch.rand(size, generator=g, dtype=torch.float32)[lo:hi]
        pos += hi - lo
    return out
