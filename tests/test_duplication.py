"""`duplication` selects what DART selects: a hand-worked example where the pivot order decides, a transcription of
the official loop (`modeling_llama_self.py`) on random tensors over many seeds, exact budgets spread over the
pivots, and the whole cut against a hand-written layer loop that computes keys and states itself."""

import math

import pytest
import torch
import torch.nn.functional as F
from decoder_reference import dart, run
from helpers import PROMPTS, batch, image, image_inputs_by_hand, tiny

import vtprune
from vtprune.registry import make_policy
from vtprune.signals import CutSignals


def on_circle(degrees: list[float]) -> torch.Tensor:
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in degrees])


def signals(norms, states, rows, text_norms, text_states, text_rows) -> CutSignals:
    return CutSignals(
        n_tokens=len(norms),
        key_norms=torch.tensor(norms, dtype=torch.float32),
        states=states,
        rows=torch.tensor(rows),
        text_key_norms=torch.tensor(text_norms, dtype=torch.float32),
        text_states=text_states,
        text_rows=torch.tensor(text_rows),
    )


def kept(signals: CutSignals, keep: int, **options) -> list[int]:
    chosen, _ = make_policy("duplication", options).cut_select(0, signals, keep)
    return sorted(chosen.tolist())


HAND = signals(
    norms=[5, 1, 2, 3, 0.5, 4],
    states=on_circle([0, 200, 120, 250, 60, 15]),
    rows=[3, 4, 5, 6, 7, 8],
    text_norms=[1, 7],
    text_states=on_circle([90, 30]),
    text_rows=[9, 10],
)
"""Six image tokens at rows 3..8 (token 0 has the largest key norm: the image pivot), two text tokens after them
(the one at row 10, at 30 degrees, is the text pivot)."""


def test_hand_worked_pivot_order_decides():
    """Pivots at rows 3 (image, 0 degrees) and 10 (text, 30 degrees). CPython's set of {3, 10} iterates 10 first
    (10 mod 8 = 2 < 3), so the text pivot takes first: the token least similar to 30 degrees is token 1 (200:
    cos 170 = -0.98); then the image pivot takes, of tokens 2..5, the least similar to 0 degrees, token 2 (120:
    cos = -0.5). Ascending order lets the image pivot take token 1 first (cos 200 = -0.94), leaving the text pivot
    token 3 (250: cos 220 = -0.77)."""
    options = {"pivot_image": 1, "pivot_text": 1}
    assert kept(HAND, 3, **options) == [0, 1, 2]
    assert kept(HAND, 3, **options, pivot_order="ascending") == [0, 1, 3]
    # four: three past the pivot, the first pivot in order (the text's) taking two: tokens 1 and 3, then token 2
    assert kept(HAND, 4, **options) == [0, 1, 2, 3]
    # one: the image pivot only
    assert kept(HAND, 1, **options) == [0]
    _, scores = make_policy("duplication", options).cut_select(0, HAND, 3)
    assert scores.tolist() == [5, 1, 2, 3, 0.5, 4]  # the trace records the key norms


def official(norms, states, image_span, text_span, token_topk, pivot_image=4, pivot_text=4) -> list[int]:
    """The official loop on one row's `[L]` key norms and `[L, D]` normed states (absolute row indices)."""
    img_piv = [image_span[i] for i in norms[image_span].topk(pivot_image).indices.tolist()]
    txt_piv = [text_span[i] for i in norms[text_span].topk(pivot_text).indices.tolist()]
    pivots = list(set(img_piv + txt_piv))
    pool = list(set(image_span) - set(img_piv))
    kept = []
    for pivot in pivots:
        cos = F.cosine_similarity(states[pivot][None], states[pool], dim=-1)
        take = [pool[i] for i in (-cos).topk(token_topk).indices.tolist()]
        pool = list(set(pool) - set(take))
        kept += take
    return sorted(set(img_piv) | set(kept))


@pytest.mark.parametrize("seed", range(40))
def test_equals_the_official_loop_on_random_tensors(seed):
    generator = torch.Generator().manual_seed(seed)
    start = int(torch.randint(1, 40, (1,), generator=generator))
    n, m = int(torch.randint(24, 80, (1,), generator=generator)), int(torch.randint(4, 30, (1,), generator=generator))
    length = start + n + m
    norms = torch.rand(length, generator=generator) * 10
    states = torch.randn(length, 16, generator=generator)
    image_span, text_span = list(range(start, start + n)), list(range(start + n, length))
    token_topk = int(torch.randint(1, (n - 4) // 8 + 1, (1,), generator=generator))
    expected = official(norms, states, image_span, text_span, token_topk)
    image_rows, text_rows = torch.tensor(image_span), torch.tensor(text_span)
    row = CutSignals(
        n_tokens=n,
        key_norms=norms[image_rows],
        states=states[image_rows],
        rows=image_rows,
        text_key_norms=norms[text_rows],
        text_states=states[text_rows],
        text_rows=text_rows,
    )
    assert kept(row, 4 + 8 * token_topk) == [i - start for i in expected]


@pytest.mark.parametrize("keep", [1, 3, 4, 5, 11, 12, 13, 37, 60])
def test_any_budget_is_kept_exactly_and_spread_over_the_pivots(keep):
    generator = torch.Generator().manual_seed(keep)
    n, m = 60, 6
    row = CutSignals(
        n_tokens=n,
        key_norms=torch.rand(n, generator=generator),
        states=torch.randn(n, 8, generator=generator),
        rows=torch.arange(n) + 2,
        text_key_norms=torch.rand(m, generator=generator),
        text_states=torch.randn(m, 8, generator=generator),
        text_rows=torch.arange(m) + n + 2,
    )
    chosen = kept(row, keep)
    assert len(chosen) == len(set(chosen)) == keep
    top = torch.sort(row.key_norms, descending=True, stable=True).indices[: min(4, keep)].tolist()
    assert set(top) <= set(chosen)  # the image pivots are always kept


def test_short_text_gives_fewer_pivots_and_none_keeps_image_pivots_only():
    generator = torch.Generator().manual_seed(0)
    n = 30
    base = {
        "n_tokens": n,
        "key_norms": torch.rand(n, generator=generator),
        "states": torch.randn(n, 8, generator=generator),
        "rows": torch.arange(n),
    }
    one_word = CutSignals(
        **base, text_key_norms=torch.ones(1), text_states=torch.randn(1, 8), text_rows=torch.tensor([n])
    )
    nothing = CutSignals(
        **base, text_key_norms=torch.ones(0), text_states=torch.randn(0, 8), text_rows=torch.zeros(0, dtype=torch.long)
    )
    assert len(kept(one_word, 14)) == 14  # 10 past the 4 image pivots, over 5 pivots
    assert len(kept(nothing, 14)) == 14  # over the 4 image pivots
    with pytest.raises(ValueError, match="set pivot_image >= 1"):
        kept(nothing, 5, pivot_image=0)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"layer": 0}, "layer must be a decoder layer >= 1"),
        ({"pivot_image": -1}, "pivot_image must be an int >= 0"),
        ({"pivot_text": 1.5}, "pivot_text must be an int >= 0"),
        ({"pivot_image": 0, "pivot_text": 0}, "needs pivots"),
        ({"pivot_order": "sorted"}, "pivot_order must be one of"),
    ],
)
def test_bad_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        vtprune.policy("duplication", **options)


BACKENDS = [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("qwen2", "eager")]


@torch.no_grad()
@pytest.mark.parametrize(("text", "attn"), BACKENDS, ids=["-".join(b) for b in BACKENDS])
@pytest.mark.parametrize("contiguous", [False, True], ids=["original", "contiguous"])
@pytest.mark.parametrize("keep", [12, 7])
def test_the_cut_equals_the_loop_by_hand(text, attn, contiguous, keep):
    """12 of 16 is the official count (4 + 8 x 1); 7 spreads 3 over the 8 pivots. Keys, norms and states are
    computed by the hand-written loop, each row alone and unpadded."""
    model, processor = tiny(text, attn, text_layers=4)
    twin = tiny(text, "eager", text_layers=4)[0]
    inputs = batch(processor, PROMPTS, [image(1), image(2)])
    positions = "contiguous" if contiguous else "original"
    with vtprune.patched(model, "duplication", keep=keep, positions=positions):
        logits = model(**inputs).logits
        trace = vtprune.last_trace(model)
    features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    # before the cut every row runs at the model's own positions (a left-padded row's start past its padding); the
    # keys' norms depend on them, unlike attention rows, so the loop renumbers only after the cut
    rows = image_inputs_by_hand(model, inputs, [(f, torch.arange(len(f))) for f in features])
    for b, (embeds, pos) in enumerate(rows):
        ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
        images = torch.where(ids == model.config.image_token_id, 0, -1)
        expected, chosen = run(twin, embeds, pos, images, {2: dart(twin, 2, keep)}, contiguous=contiguous)
        assert torch.equal(trace[b].kept, chosen[2][0])
        torch.testing.assert_close(logits[b, -len(expected) :], expected, atol=1e-5, rtol=1e-4)
    assert [r.stages for r in trace] == [(("vision", 16), ("duplication@2", keep))] * 2
    assert trace[0].layer_tokens == (16, 16) + (keep,) * 2
