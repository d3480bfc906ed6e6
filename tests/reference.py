"""Independent float64 reference of TACA eq. 10, written from the paper's formula.

Explicit logits, explicit gamma block, explicit softmax: none of the pack's
code is used, so the pack is compared against the formula, not against itself.
"""

from __future__ import annotations

from typing import Optional

import torch


def taca_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_start: int,
    text_stop: int,
    gamma: float,
    mask: Optional[torch.Tensor] = None,
    visual_rows_only_text_scaling: bool = True,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """q: (B, H, N, D); k, v: (B, H_kv, N, D) with H_kv dividing H. Returns float64 (B, H, N, D).

    P(i, j) = softmax_j(gamma_ij * scale * q_i.k_j + mask_ij) with gamma_ij = gamma
    for visual query i and text key j, else 1, and scale = 1/sqrt(D) unless given.  With
    ``visual_rows_only_text_scaling=False`` the text keys are scaled for every
    query (the paper's listing 2), used to check the text rows of 'selective'.
    Grouped-query attention (H_kv < H): query head h reads key/value head h // (H / H_kv).
    """
    q, k, v = q.double(), k.double(), v.double()
    heads, kv_heads = q.shape[1], k.shape[1]
    if kv_heads != heads:
        assert heads % kv_heads == 0 and v.shape[1] == kv_heads, (q.shape, k.shape, v.shape)
        kv_head_of = [h // (heads // kv_heads) for h in range(heads)]
        k, v = k[:, kv_head_of], v[:, kv_head_of]
    n_q, n_k = q.shape[-2], k.shape[-2]
    if scale is None:
        scale = 1.0 / (q.shape[-1] ** 0.5)
    logits = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    is_text_q = torch.zeros(n_q, dtype=torch.bool)
    is_text_q[text_start:text_stop] = True
    is_text_k = torch.zeros(n_k, dtype=torch.bool)
    is_text_k[text_start:text_stop] = True
    factor = torch.ones(n_q, n_k, dtype=torch.float64)
    if visual_rows_only_text_scaling:
        factor[(~is_text_q)[:, None] & is_text_k[None, :]] = gamma
    else:
        factor[:, is_text_k] = gamma
    logits = logits * factor
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask.double()
    weights = torch.softmax(logits, dim=-1)
    return torch.einsum("bhij,bhjd->bhid", weights, v)


def max_row_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Worst relative error over query rows (a row = one token's output vector)."""
    a, b = a.double(), b.double()
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)).max())
