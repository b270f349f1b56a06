"""Image-token positions against LLaVA's own splicing code (the reference)."""
import types

import pytest
import torch
from llava.model.llava_arch import LlavaMetaForCausalLM

from basic_plugin.host.positions import IMAGE_TOKEN_INDEX, image_token_positions
from tests.helpers import collate_right_padded

D = 3
MARK = 1000.0


class SplicingStub(LlavaMetaForCausalLM):
    """Just enough of a LLaVA model to run LLaVA's real prepare_inputs_labels_for_multimodal."""

    def __init__(self, n_tokens, max_length, padding_side):
        self.n_tokens = n_tokens
        self.config = types.SimpleNamespace(tokenizer_model_max_length=max_length,
                                            tokenizer_padding_side=padding_side)
        self.embed = torch.nn.Embedding(50, D)
        torch.nn.init.uniform_(self.embed.weight, -1, 1)
        self.device = torch.device("cpu")

    def get_model(self):
        return types.SimpleNamespace(embed_tokens=self.embed)

    def get_vision_tower(self):
        return object()

    def encode_images(self, images):
        # every row is unique and far from any text embedding: MARK + image * 100 + patch
        n_img = images.shape[0]
        ids = MARK + torch.arange(n_img)[:, None] * 100 + torch.arange(self.n_tokens)[None, :]
        return ids[..., None].expand(n_img, self.n_tokens, D).float()


def run_case(samples, n_tokens=4, max_length=None, padding_side="right", mask_none=False):
    """samples: lists of token ids (with IMAGE_TOKEN_INDEX), collated with right padding like LLaVA."""
    ids, mask = collate_right_padded(samples)
    n_images = sum(max(1, s.count(IMAGE_TOKEN_INDEX)) for s in samples)
    images = torch.zeros(n_images, 3, 2, 2)
    stub = SplicingStub(n_tokens, max_length, padding_side)
    attn = None if mask_none else mask
    _, _, new_mask, _, embeds, _ = stub.prepare_inputs_labels_for_multimodal(
        ids, None, attn, None, ids.clone(), images)
    pos = image_token_positions(ids, attn, n_tokens, max_length=max_length, padding_side=padding_side)
    return embeds.detach(), new_mask, pos


def check(embeds, pos):
    rows = embeds[pos.batch_index, pos.seq_index, 0]
    expected = MARK + pos.image_index.float() * 100 + pos.patch_index.float()
    assert torch.equal(rows, expected)
    # and no image row was missed: every embedding >= MARK is listed
    assert int((embeds[..., 0] >= MARK).sum()) == pos.num_rows
    assert pos.sequence_length == embeds.shape[1]


I = IMAGE_TOKEN_INDEX


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_sides(side):
    samples = [[1, I, 5, 6, 7, 2], [1, I, 5, 2], [1, 3, I, 9, 9, 9, 9, 9, 2]]
    embeds, _, pos = run_case(samples, padding_side=side)
    check(embeds, pos)
    assert pos.has_image.tolist() == [True, True, True]
    assert pos.num_rows == 12


def test_text_only_samples_consume_a_dummy_image():
    samples = [[1, 5, 6, 2], [1, I, 5, 2], [1, 7, 2], [1, I, 8, 8, 2]]
    embeds, _, pos = run_case(samples)
    check(embeds, pos)
    assert pos.has_image.tolist() == [False, True, False, True]
    assert sorted(set(pos.image_index.tolist())) == [1, 3]


def test_two_images_in_one_sample_and_block_ends():
    samples = [[1, I, 5, I, 6, 2], [1, 4, I, 2]]
    embeds, _, pos = run_case(samples, n_tokens=3)
    check(embeds, pos)
    first = pos.batch_index == 0
    assert pos.block_end[first].tolist() == [3, 3, 3, 7, 7, 7]
    assert pos.image_index[first].tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("max_length", [3, 4, 6, 20])
def test_truncation_through_the_image_block(side, max_length):
    samples = [[1, 1, I, 5, 6, 2], [1, I, 2], [1, 2, 3, 4, 5, 6, 7, 8]]
    embeds, _, pos = run_case(samples, n_tokens=4, max_length=max_length, padding_side=side)
    check(embeds, pos)
    kept = pos.batch_index == 0
    n_kept = int(kept.sum())
    assert n_kept == max(0, min(4, max_length - 2))
    assert bool(pos.block_complete[kept].all()) == (n_kept == 4) or n_kept == 0


def test_start_end_tokens_around_the_image_and_no_mask():
    im_start, im_end = 31, 32  # mm_use_im_start_end wraps the image token in two ordinary tokens
    samples = [[1, im_start, I, im_end, 5, 2], [1, im_start, I, im_end, 2]]
    embeds, _, pos = run_case(samples, mask_none=True)
    check(embeds, pos)
    assert pos.seq_index[pos.batch_index == 0].tolist() == [2, 3, 4, 5]


def test_batch_without_images_gives_no_rows():
    embeds, _, pos = run_case([[1, 5, 2], [1, 6, 7, 2]])
    check(embeds, pos)
    assert pos.num_rows == 0 and not bool(pos.has_image.any())


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="padding_side"):
        image_token_positions(torch.ones(1, 2, dtype=torch.long), None, 4, padding_side="middle")
