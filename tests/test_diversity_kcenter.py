"""`diversity_kcenter` selects what greedy farthest-first k-center on cosine distance selects."""

import math

import pytest
import torch
from helpers import PROMPTS, assert_rows_match, batch, image, row, run_kept_by_hand, tiny

import vtprune
from vtprune.registry import make_policy, policies
from vtprune.signals import ImageSignals, SignalRequest, VisionLayout

BACKENDS = [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("qwen2", "eager")]


def kcenter_by_hand(features: torch.Tensor, keep: int) -> list[int]:
    """Sorted kept indices, as a plain loop in float64: seed closest to the mean of the unit vectors, then
    the unchosen token whose smallest 1 - cos to a chosen token is largest, first index on ties."""
    vectors = features.double().tolist()
    n = len(vectors)

    def cos(a: list[float], b: list[float]) -> float:
        return sum(p * q for p, q in zip(a, b, strict=True)) / math.sqrt(sum(p * p for p in a) * sum(q * q for q in b))

    units = [[v / math.sqrt(sum(w * w for w in vector)) for v in vector] for vector in vectors]
    mean = [sum(column) / n for column in zip(*units, strict=True)]
    closeness = [sum(u * m for u, m in zip(unit, mean, strict=True)) for unit in units]
    chosen = [closeness.index(max(closeness))]
    while len(chosen) < min(keep, n):
        best, farthest = None, -math.inf
        for i in range(n):
            if i in chosen:
                continue
            nearest = min(1 - cos(vectors[i], vectors[s]) for s in chosen)
            if nearest > farthest:
                best, farthest = i, nearest
        chosen.append(best)
    return sorted(chosen)


def select(features: torch.Tensor, keep: int) -> list[int]:
    signals = ImageSignals(n_tokens=len(features), features=features)
    return make_policy("diversity_kcenter", {}).select(signals, keep).kept.tolist()


def test_hand_worked_farthest_first_order():
    # Angles (degrees) and lengths of 2-D tokens; only the direction matters after normalisation.
    # The unit vectors sum to (1 + .940 + .766 + 0 - .940, 0 + .342 + .643 + 1 - .342) = (1.766, 1.643),
    # pointing at about 43 degrees, so the seed is token 3 (40). On the unit circle 1 - cos grows with the
    # angle between tokens, so each step takes the token with the widest angle to its nearest chosen one:
    #   chosen {40}:          90 -> 50, 0 -> 40, 200 -> 160, 20 -> 20   => token 2 (200)
    #   chosen {40, 200}:     90 -> 50, 0 -> 40, 20 -> 20                => token 0 (90)
    #   chosen {40, 200, 90}: 0 -> 40, 20 -> 20                          => token 1 (0), then token 4 (20)
    angles, lengths = [90, 0, 200, 40, 20], [3.0, 2.0, 1.0, 0.5, 4.0]
    features = torch.tensor(
        [[r * math.cos(math.radians(a)), r * math.sin(math.radians(a))] for a, r in zip(angles, lengths, strict=True)]
    )
    assert select(features, 1) == [3]
    assert select(features, 2) == [2, 3]
    assert select(features, 3) == [0, 2, 3]
    assert select(features, 4) == [0, 1, 2, 3]
    assert select(features, 5) == [0, 1, 2, 3, 4]
    assert select(features, 9) == [0, 1, 2, 3, 4]


def test_ties_go_to_the_lowest_index_and_chosen_tokens_are_never_chosen_again():
    # Unit vectors (0,1) (1,0) (0,-1) (1,0): mean (0.5, 0); tokens 1 and 3 tie as closest -> seed 1.
    # Distances to {1}: token 0 -> 1, token 2 -> 1 (a tie: token 0), token 3 -> 0. Then token 2
    # (distance 1 to token 1) and last token 3, at distance 0 like the already chosen token 1.
    features = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, -1.0], [2.0, 0.0]])
    assert select(features, 1) == [1]
    assert select(features, 2) == [0, 1]
    assert select(features, 3) == [0, 1, 2]
    assert select(features, 4) == [0, 1, 2, 3]


def test_batch_of_different_lengths_equals_a_plain_loop_and_each_image_alone():
    generator = torch.Generator().manual_seed(0)
    lengths, keeps = [7, 40, 23, 31, 12], [3, 12, 23, 1, 20]  # the third keeps all, the last more than it has
    features = [torch.randn(n, 8, generator=generator) for n in lengths]
    features[1][5] = features[1][17]  # a duplicated token
    signals = [ImageSignals(n_tokens=n, features=f) for n, f in zip(lengths, features, strict=True)]
    policy = make_policy("diversity_kcenter", {})
    selections = policy.select_batch(signals, keeps)
    for image_signals, f, keep, selection in zip(signals, features, keeps, selections, strict=True):
        assert selection.kept.dtype == torch.long and selection.scores is None
        assert selection.kept.tolist() == kcenter_by_hand(f, keep)
        assert torch.equal(policy.select(image_signals, keep).kept, selection.kept)
    assert [len(s.kept) for s in selections] == [3, 12, 23, 1, 12]


def test_half_precision_features_are_compared_in_float32():
    features = torch.randn(30, 16, generator=torch.Generator().manual_seed(1)).half()
    assert select(features, 9) == kcenter_by_hand(features.float(), 9)


def test_registration_and_request():
    assert "diversity_kcenter" in policies()
    policy = make_policy("diversity_kcenter", {})
    assert policy.request(VisionLayout(num_layers=4, feature_layer=2, has_cls=True)) == SignalRequest(features=True)
    with pytest.raises(TypeError, match="has no option seed"):
        make_policy("diversity_kcenter", {"seed": 0})


@torch.no_grad()
@pytest.mark.parametrize(("text", "attn"), BACKENDS, ids=["-".join(b) for b in BACKENDS])
def test_end_to_end_kept_sets_batch_rows_and_pruned_forward(text, attn):
    model, processor = tiny(text, attn)
    prompts = ["USER: <image> and <image>\nwhich is red ? ASSISTANT:", PROMPTS[1]]
    inputs = batch(processor, prompts, [image(51), image(52), image(53)])
    features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    with vtprune.patched(model, vtprune.policy("diversity_kcenter", relevance_layer=None), keep=5):
        logits = model(**inputs).logits
        trace = vtprune.last_trace(model)
        kept = [record.kept for record in trace]
        alone = []
        for b in range(2):
            model(**row(inputs, b, [2, 1]))
            alone += [record.kept for record in vtprune.last_trace(model)]
    assert [record.n_after for record in trace] == [5, 5, 5]
    assert all(record.scores is None for record in trace)
    assert [k.tolist() for k in kept] == [kcenter_by_hand(f, 5) for f in features]
    assert all(torch.equal(a, b) for a, b in zip(alone, kept, strict=True))
    assert_rows_match(logits, run_kept_by_hand(model, inputs, kept))
