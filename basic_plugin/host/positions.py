"""Where the image tokens sit in the sequence LLaVA actually feeds the LLM.

LLaVA's ``prepare_inputs_labels_for_multimodal`` splices the projector output
in place of each ``IMAGE_TOKEN_INDEX`` but does not return where. These
positions are re-derived from the batch with the same rules: padding removed by
the attention mask, each image token replaced by N rows, truncation to
``tokenizer_model_max_length``, re-padding on ``tokenizer_padding_side``, and one
image feature consumed by every text-only sample (its dummy image).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IMAGE_TOKEN_INDEX = -200  # llava.constants.IMAGE_TOKEN_INDEX; kept here so tests need no llava import


@dataclass
class ImagePositions:
    """One entry per image-token row that survives truncation (M rows in all)."""

    batch_index: torch.Tensor  # (M,) sample of the row
    seq_index: torch.Tensor  # (M,) position in the padded LLM input
    image_index: torch.Tensor  # (M,) row of the projector output (image_features)
    patch_index: torch.Tensor  # (M,) patch inside that image
    block_end: torch.Tensor  # (M,) position of the last surviving row of this image's block
    block_complete: torch.Tensor  # (M,) bool: the whole block survived truncation
    has_image: torch.Tensor  # (B,) bool: the sample has at least one surviving image row
    tokens_per_image: int
    sequence_length: int

    @property
    def num_rows(self) -> int:
        return int(self.batch_index.numel())

    def to(self, device) -> "ImagePositions":
        moved = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.__dict__.items()}
        return ImagePositions(**moved)


def image_token_positions(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    tokens_per_image: int,
    *,
    max_length: int | None = None,
    padding_side: str = "right",
) -> ImagePositions:
    """Re-derive the image rows of the spliced LLM input from the collated batch."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if tokens_per_image <= 0:
        raise ValueError("tokens_per_image must be positive")
    ids_cpu = input_ids.detach().cpu()
    if attention_mask is None:
        mask_cpu = torch.ones_like(ids_cpu, dtype=torch.bool)
    else:
        mask_cpu = attention_mask.detach().cpu().bool()
    n = tokens_per_image
    per_sample = []  # (spliced length, [(start, image_index), ...])
    image_cursor = 0
    for ids, mask in zip(ids_cpu, mask_cpu):
        kept = ids[mask]
        where = torch.nonzero(kept == IMAGE_TOKEN_INDEX).flatten().tolist()
        if not where:
            image_cursor += 1  # the dummy image of a text-only sample is consumed
            per_sample.append((kept.numel(), []))
            continue
        blocks = []
        for k, p in enumerate(where):
            blocks.append((p + k * (n - 1), image_cursor))
            image_cursor += 1
        per_sample.append((kept.numel() + len(where) * (n - 1), blocks))

    lengths = [length if max_length is None else min(length, max_length) for length, _ in per_sample]
    padded = max(lengths) if lengths else 0
    cols = {k: [] for k in ("b", "s", "img", "patch", "end", "complete")}
    has_image = torch.zeros(len(per_sample), dtype=torch.bool)
    patch = torch.arange(n)
    for b, ((_, blocks), length) in enumerate(zip(per_sample, lengths)):
        offset = padded - length if padding_side == "left" else 0
        for start, img in blocks:
            keep = int(max(0, min(n, length - start)))
            if keep == 0:
                continue
            has_image[b] = True
            rows = start + patch[:keep]
            cols["b"].append(torch.full((keep,), b))
            cols["s"].append(rows + offset)
            cols["img"].append(torch.full((keep,), img))
            cols["patch"].append(patch[:keep])
            cols["end"].append(torch.full((keep,), start + keep - 1 + offset))
            cols["complete"].append(torch.full((keep,), keep == n))

    def cat(key, dtype=torch.long):
        return torch.cat(cols[key]).to(dtype) if cols[key] else torch.zeros(0, dtype=dtype)

    device = input_ids.device
    return ImagePositions(
        batch_index=cat("b").to(device),
        seq_index=cat("s").to(device),
        image_index=cat("img").to(device),
        patch_index=cat("patch").to(device),
        block_end=cat("end").to(device),
        block_complete=cat("complete", torch.bool).to(device),
        has_image=has_image.to(device),
        tokens_per_image=n,
        sequence_length=padded,
    )
