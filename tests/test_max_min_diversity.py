"""`max_min_diversity` selects what DivPrune's greedy max-min diversity selects: a hand-worked example, and a
transcription of the official loop (`llava_arch.py`) on random features over many seeds."""

import math

import pytest
import torch

from vtprune.registry import make_policy, policies
from vtprune.signals import ImageSignals, SignalRequest, VisionLayout


def select(features: torch.Tensor, keep: int) -> list[int]:
    return make_policy("max_min_diversity", {}).select(ImageSignals(n_tokens=len(features), features=features), keep)


def kept(features: torch.Tensor, keep: int) -> list[int]:
    return select(features, keep).kept.tolist()


def official(features: torch.Tensor, keep: int) -> list[int]:
    """DivPrune's loop as its code writes it (in float64 here): D = 1 - Xn Xn^T; the seed maximises the
    second-smallest entry of its column (its distance to the nearest other token, D_jj being the smallest); each
    next pick maximises the smallest distance to the picks so far, picks not masked; kept sorted."""
    units = torch.nn.functional.normalize(features.double(), dim=-1)
    distance = 1 - units @ units.T
    picks = [int(distance.sort(0).values[1].argmax())]
    for _ in range(1, keep):
        picks.append(int(distance[picks].min(0).values.argmax()))
    return sorted(picks)


def test_hand_worked_max_min_order():
    # 2-D tokens at these angles (degrees; lengths do not matter after normalisation). 1 - cos grows with the
    # angle, so distances compare as angles. Nearest other token: 0 -> 10, 10 -> 10, 20 -> 10, 90 -> 70,
    # 200 -> 110 (to 90): the seed is token 4 (200). Then, nearest chosen angle:
    #   chosen {200}:          0 -> 160, 10 -> 170, 20 -> 180, 90 -> 110  => token 2 (20)
    #   chosen {200, 20}:      0 -> 20, 10 -> 10, 90 -> 70                => token 3 (90)
    #   chosen {200, 20, 90}:  0 -> 20, 10 -> 10                          => token 0 (0), then token 1 (10)
    angles, lengths = [0, 10, 20, 90, 200], [1.0, 3.0, 0.5, 2.0, 4.0]
    features = torch.tensor(
        [[r * math.cos(math.radians(a)), r * math.sin(math.radians(a))] for a, r in zip(angles, lengths, strict=True)]
    )
    assert kept(features, 1) == [4]
    assert kept(features, 2) == [2, 4]
    assert kept(features, 3) == [2, 3, 4]
    assert kept(features, 4) == [0, 2, 3, 4]
    assert kept(features, 5) == [0, 1, 2, 3, 4]
    assert kept(features, 9) == [0, 1, 2, 3, 4]
    assert select(features, 2).scores is None


def test_duplicates_are_never_the_seed_and_never_picked_twice():
    # Tokens 0 and 1 are the same direction: each has a nearest other token at distance 0, so token 2 is the
    # seed; then tokens 0 and 1 tie (token 0), and token 1 is still taken rather than token 0 again.
    features = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    assert kept(features, 1) == [2]
    assert kept(features, 2) == [0, 2]
    assert kept(features, 3) == [0, 1, 2]


@pytest.mark.parametrize("seed", range(40))
def test_kept_sets_equal_the_official_loop_on_random_features(seed):
    generator = torch.Generator().manual_seed(seed)
    n = int(torch.randint(8, 120, (), generator=generator))
    keep = int(torch.randint(1, n + 1, (), generator=generator))
    features = torch.randn(n, 16, generator=generator)
    assert kept(features, keep) == official(features, keep)


def test_a_batch_of_different_lengths_equals_each_image_alone():
    generator = torch.Generator().manual_seed(0)
    lengths, keeps = [7, 40, 23, 12], [3, 12, 23, 20]
    images = [ImageSignals(n_tokens=n, features=torch.randn(n, 8, generator=generator)) for n in lengths]
    policy = make_policy("max_min_diversity", {})
    together = policy.select_batch(images, keeps)
    alone = [policy.select(image, keep).kept.tolist() for image, keep in zip(images, keeps, strict=True)]
    assert [s.kept.tolist() for s in together] == alone
    assert [len(s.kept) for s in together] == [3, 12, 23, 12]
    assert together[1].kept.tolist() == official(images[1].features, 12)


def test_registration_and_request():
    assert "max_min_diversity" in policies()
    policy = make_policy("max_min_diversity", {})
    assert policy.acts_on_vision and not policy.acts_in_decoder
    assert policy.request(VisionLayout(num_layers=4, feature_layer=2, has_cls=True)) == SignalRequest(features=True)
    with pytest.raises(TypeError, match="has no option"):
        make_policy("max_min_diversity", {"ratio": 0.098})
