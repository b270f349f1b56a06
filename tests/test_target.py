"""The target-layer rule (basic_plugin.basic.target) against the paper's numbers and formula."""
from fractions import Fraction

import pytest

from basic_plugin.basic.target import default_depth, target_layers, target_weights, valid_depth


@pytest.mark.parametrize("layers,depth", [(32, 16), (40, 20), (30, 15), (4, 2), (1, 1)])
def test_default_depth_is_half_the_layers(layers, depth):
    assert default_depth(layers) == depth


@pytest.mark.parametrize("k", [1, 2, 7, 16])
def test_weights_are_l_squared_normalised(k):
    exact = [Fraction(l * l, sum(j * j for j in range(1, k + 1))) for l in range(1, k + 1)]
    assert target_layers(k) == list(range(1, k + 1))
    assert target_weights(k) == pytest.approx([float(w) for w in exact], rel=1e-15)


def test_depth_must_stay_below_the_final_normed_layer():
    assert valid_depth(31, 32) and not valid_depth(32, 32) and not valid_depth(0, 32)
