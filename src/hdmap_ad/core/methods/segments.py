"""Row-segment masks on the patch-token grid, shared by hseg and vdrop (docs/design.md#m-hseg).

The patch tokens of an H_p×W_p grid are in row-major order; a row is W_p consecutive tokens. For each
row (of each sample, or sample and head), independently: with probability `row_p` one segment of
`seg_len` consecutive tokens is placed at a start drawn uniformly from the W_p − seg_len + 1
positions, and each token of the segment is dropped with probability `drop_p`. Expected fraction
of dropped tokens: row_p · seg_len / W_p · drop_p.

Vectorised: three draws from the run's torch generator per call, whatever the probabilities, so the
generator advances the same way every step (a resumed run draws what the uninterrupted run drew).
"""

from __future__ import annotations

import torch
from torch import Tensor


def row_segment_mask(
    lead: tuple[int, ...], rows: int, width: int, row_p: float, seg_len: int, drop_p: float, device: torch.device
) -> Tensor:
    """Bool mask (*lead, rows, width), True where a token is dropped."""
    if not 1 <= seg_len <= width:
        raise ValueError(f"segment length {seg_len} does not fit a row of {width} tokens")
    chosen = torch.rand((*lead, rows), device=device) < row_p  # rows that get a segment
    start = torch.randint(0, width - seg_len + 1, (*lead, rows), device=device)
    hit = torch.rand((*lead, rows, seg_len), device=device) < drop_p  # per token of the segment
    offset = torch.arange(width, device=device) - start.unsqueeze(-1)  # (*lead, rows, width)
    inside = (offset >= 0) & (offset < seg_len)
    token_hit = torch.gather(hit, -1, offset.clamp(0, seg_len - 1))
    return chosen.unsqueeze(-1) & inside & token_hit


def expected_fraction(row_p: float, seg_len: int, width: int, drop_p: float) -> float:
    """E[dropped tokens / all tokens] of `row_segment_mask`."""
    return row_p * seg_len / width * drop_p
