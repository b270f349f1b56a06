"""BASIC's health metrics: is the projector output collapsing, and is BASIC out-pulling the caption loss?

Computed for every batch while BASIC is on, also with both lambdas at 0 (a monitor-only run
that trains exactly like the baseline), without gradient, left on the device (the host
averages them at logging steps):

- ``basic_v_pairwise_cos`` / ``basic_vhat_pairwise_cos``: mean cosine between two image
  tokens of the same image, for the projector output v and the target vhat (collapse onto
  one direction shows as a value near 1);
- ``basic_v_norm`` / ``basic_vhat_norm``: mean L2 norm of those tokens;
- ``basic_weighted_cos``: the a_i-weighted cosine between v_i and vhat_i as the terms compare them
  (with ``--basic_drop_channels`` / ``--basic_standardize_target`` applied: what L_das pulls up);
- ``basic_share``: BASIC's part of the loss, (das + sds) / (lm + das + sds), lambdas included.
"""
from __future__ import annotations

import torch


def mean_pairwise_cosine(rows: torch.Tensor, image_index: torch.Tensor, num_images: int) -> torch.Tensor:
    """Mean over images (with >= 2 tokens) of the mean cosine between two distinct tokens of the image.

    With unit rows u and S = sum of an image's u: sum_{i != j} u_i.u_j = |S|^2 - m, so no m x m
    matrix is formed. Images are gathered with a one-hot matmul (a fixed reduction order).
    """
    if rows.numel() == 0 or num_images == 0:
        return rows.new_zeros((), dtype=torch.float32)
    unit = torch.nn.functional.normalize(rows.float(), dim=-1)
    member = (image_index.unsqueeze(0) == torch.arange(num_images, device=rows.device).unsqueeze(1)).float()
    sums = member @ unit
    counts = member.sum(dim=1)
    pairs = counts * (counts - 1)
    per_image = (sums.pow(2).sum(dim=1) - counts) / pairs.clamp_min(1)
    valid = pairs > 0
    return torch.where(valid, per_image, torch.zeros_like(per_image)).sum() / valid.sum().clamp_min(1)


def health_metrics(student, target, weights, image_index, num_images, lm_loss, das, sds, compared=None) -> dict:
    """The metrics above for one batch (``weights``: a_i as used by the losses; ``compared``: (v, vhat) as
    the terms compare them, when a target variant changes them; norms and pairwise cosines stay v's and vhat's)."""
    with torch.no_grad():
        student, target = student.detach().float(), target.detach().float()
        s_cmp, t_cmp = (student, target) if compared is None else (compared[0].detach().float(),
                                                                   compared[1].detach().float())
        if student.shape[0]:
            cos = torch.nn.functional.cosine_similarity(s_cmp, t_cmp, dim=-1)
            w = weights.detach().float()
            weighted = (w * cos).sum() / w.sum().clamp_min(1e-12)
            v_norm, vhat_norm = student.norm(dim=-1).mean(), target.norm(dim=-1).mean()
        else:
            weighted = v_norm = vhat_norm = student.new_zeros(())
        basic = (das.detach() + sds.detach()).float()
        share = basic / (lm_loss.detach().float() + basic).clamp_min(1e-12)
        return {
            "basic_v_pairwise_cos": mean_pairwise_cosine(student, image_index, num_images),
            "basic_vhat_pairwise_cos": mean_pairwise_cosine(target, image_index, num_images),
            "basic_v_norm": v_norm,
            "basic_vhat_norm": vhat_norm,
            "basic_weighted_cos": weighted,
            "basic_share": share,
        }
