"""The contracts every family and every policy that fits it keep, in one suite.

A family joins with one adapter file and one entry in `subjects.SUBJECTS`. Each subject is a tiny model
with a batch of prompts of different lengths (the shorter left-padded) holding the kinds of visual
input the family takes. References are built by hand (`subjects.hand_rows`, `decoder_reference.run`),
from the unpatched model's own encoders and layers, never from vtprune's engine. What a family or a policy
does beyond these (the papers' selections, tower loops, crops, M-RoPE details) stays in its own file.
"""

from __future__ import annotations

import functools

import pytest
import torch
from decoder_reference import run
from subjects import SUBJECTS, Subject, hand_rows, inputs_for, model_for

import vtprune

POLICIES = {
    "cls_attention": {},
    "conditional_dpp": {},
    "diversity_kcenter": {"relevance_layer": 2, "relevance_keep": 2},
    "duplication": {"layer": 2},
    "fastv": {"layer": 2},
    "hierarchical": {},
    "information_flow": {},
    "max_min_diversity": {},
    "random": {},
    "transition": {"layers": (2,), "ratios": (0.5,)},
    "uniform": {},
    "visionzip": {},
    "visual_cues": {},
}
SELECTING = [
    "cls_attention",
    "conditional_dpp",
    "diversity_kcenter",
    "hierarchical",
    "max_min_diversity",
    "random",
    "uniform",
    "visual_cues",
]
"""Policies that select after the tower (ToDRE without its decoder stage), whose kept tokens are the unpatched
encoder's features: their pruned forward is checked against rows built by hand."""
IN_DECODER = ["duplication", "fastv", "transition"]
GREEDY = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
CLOSE = {"atol": 1e-5, "rtol": 1e-4}


def refusal(subject: Subject, policy: str) -> str | None:
    """Why `policy` does not fit the subject's inputs, as the message it is refused with; None where it fits."""
    in_tower = policy in ("information_flow", "visionzip")
    if subject.model_type == "llava_onevision" and in_tower:
        return "prunes inside the vision tower, where a token is one patch"
    return None


def fitting(policies=POLICIES) -> list:
    return [pytest.param(s, p, id=f"{s}-{p}") for s in SUBJECTS for p in policies if refusal(s, p) is None]


def policy_of(name: str, vision_only: bool = False, keep_all: bool = False):
    """The policy with the suite's options; ToDRE without its decoder stage, or with one that keeps everything."""
    if vision_only and name == "diversity_kcenter":
        return vtprune.policy(name, relevance_layer=None)
    if keep_all and name == "diversity_kcenter":
        return vtprune.policy(name, relevance_layer=2, relevance_keep=10_000)
    return vtprune.policy(name, **POLICIES[name])


@functools.cache
def unpatched(subject: Subject, attn: str) -> tuple[torch.Tensor, torch.Tensor]:
    model, _ = model_for(subject.family, attn)
    inputs = inputs_for(subject)
    with torch.no_grad():
        return model(**inputs).logits, model.generate(**inputs, **GREEDY)


def kept_of(model) -> list[torch.Tensor]:
    return [record.kept for record in vtprune.last_trace(model)]


@torch.no_grad()
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(("subject", "policy"), fitting())
def test_keep_all_equals_unpatched(subject, policy, attn):
    """Logits and generated tokens bit-equal to the unpatched model's; every visual token kept."""
    model, _ = model_for(subject.family, attn)
    inputs = inputs_for(subject)
    logits, tokens = unpatched(subject, attn)
    with vtprune.patched(model, policy_of(policy, keep_all=True), keep=1.0):
        assert torch.equal(model(**inputs).logits, logits)
        assert all(r.n_after == r.n_before for r in vtprune.last_trace(model))
        assert torch.equal(model.generate(**inputs, **GREEDY), tokens)


POSITIONED = [
    pytest.param(*case.values, mode, id=f"{case.id}-{mode}")
    for case in fitting(SELECTING)
    for mode in ("original", "contiguous")
    if mode == "original" or not case.values[0].packed  # M-RoPE keeps original positions (a refusal, below)
]


@torch.no_grad()
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(("subject", "policy", "positions"), POSITIONED)
def test_pruned_equals_the_kept_tokens_run_by_hand(subject, policy, positions, attn):
    """Each row of the pruned batch equals a hand-run row holding its text and only the kept tokens, each with
    the unpatched encoder's feature and its position in the unpruned prompt (or renumbered, `contiguous`)."""
    model, _ = model_for(subject.family, attn)
    twin, _ = model_for(subject.family, "eager")
    inputs = inputs_for(subject)
    with vtprune.patched(model, policy_of(policy, vision_only=True), keep=0.3, positions=positions):
        logits = model(**inputs).logits
        trace = vtprune.last_trace(model)
    assert all(r.n_after < r.n_before for r in trace)
    rows = hand_rows(model, inputs, [r.delivered for r in trace], contiguous=positions == "contiguous")
    for b, row in enumerate(rows):
        expected, _ = run(twin, row.embeds, row.positions, row.items, {}, added=row.deepstack)
        torch.testing.assert_close(logits[b, -len(expected) :], expected, **CLOSE)


@torch.no_grad()
@pytest.mark.parametrize(("subject", "policy"), fitting())
def test_batch_equals_each_row_alone(subject, policy):
    """Batched and left-padded, pruned generate gives each row the tokens, step logits and kept sets it gets
    alone."""
    model, _ = model_for(subject.family, "sdpa")
    with vtprune.patched(model, policy_of(policy), keep=0.3):
        out = model.generate(**inputs_for(subject), **GREEDY, return_dict_in_generate=True, output_logits=True)
        kept = kept_of(model)
        first = 0
        for b in range(len(subject.prompts)):
            alone = model.generate(
                **inputs_for(subject, (b,)), **GREEDY, return_dict_in_generate=True, output_logits=True
            )
            assert out.sequences[b, -4:].tolist() == alone.sequences[0, -4:].tolist()
            steps = torch.stack([step[b] for step in out.logits])
            torch.testing.assert_close(steps, torch.stack([step[0] for step in alone.logits]), **CLOSE)
            items = len(subject.media[b])
            assert all(torch.equal(a, k) for a, k in zip(kept_of(model), kept[first : first + items], strict=True))
            first += items


@torch.no_grad()
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(("subject", "policy"), fitting(IN_DECODER))
def test_cached_decode_after_a_cut_equals_an_uncached_recompute(subject, policy, attn):
    """Every generated step equals the hand-written layer loop run without a cache on the row's prompt plus the
    tokens generated before it, cut before layer 2 to the same kept sets (decoding continues from the last
    position + 1)."""
    model, _ = model_for(subject.family, attn)
    twin, _ = model_for(subject.family, "eager")
    inputs = inputs_for(subject)
    with vtprune.patched(model, policy_of(policy), keep=0.3):
        out = model.generate(**inputs, **GREEDY, return_dict_in_generate=True, output_logits=True)
        trace = vtprune.last_trace(model)
    assert all(r.stages[-1][0] == f"{policy}@2" and r.n_after < r.n_before for r in trace)
    cuts = {2: [r.kept for r in trace]}
    new = out.sequences[:, inputs["input_ids"].shape[1] :]
    for b, row in enumerate(hand_rows(model, inputs)):
        generated = new[b, :-1]
        embeds = torch.cat([row.embeds, model.get_input_embeddings()(generated)[None]], 1)
        positions = torch.cat([row.positions, row.positions[..., -1:] + 1 + torch.arange(len(generated))], -1)
        items = torch.cat([row.items, torch.full((len(generated),), -1)])
        expected, chosen = run(twin, embeds, positions, items, cuts, added=row.deepstack)
        steps = torch.stack([step[b] for step in out.logits])
        torch.testing.assert_close(steps, expected[-len(steps) :], **CLOSE)
        without_end = expected[-len(steps) :].clone()
        without_end[:, torch.tensor(model.generation_config.eos_token_id)] = -torch.inf  # min_new_tokens forbids it
        assert new[b].tolist() == without_end.argmax(-1).tolist()


@torch.no_grad()
@pytest.mark.parametrize(("subject", "policy"), fitting())
def test_sdpa_and_eager_select_identical_tokens(subject, policy):
    kept = []
    for attn in ("sdpa", "eager"):
        model, _ = model_for(subject.family, attn)
        with vtprune.patched(model, policy_of(policy), keep=0.3):
            model(**inputs_for(subject))
            kept.append(kept_of(model))
    assert all(torch.equal(a, b) for a, b in zip(*kept, strict=True))


def hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@torch.no_grad()
@pytest.mark.parametrize(("subject", "policy"), fitting())
def test_unpatch_restores_exactly(subject, policy):
    model, _ = model_for(subject.family, "sdpa")
    inputs = inputs_for(subject)
    logits, _ = unpatched(subject, "sdpa")
    before = (hooks(model), set(model.__dict__))
    vtprune.patch(model, policy_of(policy), keep=0.3)
    assert hooks(model) > before[0] or set(model.__dict__) != before[1]
    pruned = model(**inputs).logits
    vtprune.unpatch(model)
    assert pruned.shape[1] < logits.shape[1]
    assert (hooks(model), set(model.__dict__)) == before
    assert torch.equal(model(**inputs).logits, logits)


@torch.no_grad()
@pytest.mark.parametrize(
    ("subject", "policy"),
    [pytest.param(s, p, id=f"{s}-{p}") for s in SUBJECTS for p in POLICIES if refusal(s, p) is not None],
)
def test_unfit_policies_are_refused_with_the_reason(subject, policy):
    model, _ = model_for(subject.family, "sdpa")
    with vtprune.patched(model, policy_of(policy), keep=0.3), pytest.raises(ValueError, match=refusal(subject, policy)):
        model(**inputs_for(subject))
    logits, _ = unpatched(subject, "sdpa")
    assert torch.equal(model(**inputs_for(subject)).logits, logits)


@pytest.mark.parametrize("subject", [s for s in SUBJECTS if s.packed], ids=str)
def test_unfit_options_are_refused(subject):
    model, _ = model_for(subject.family, "sdpa")
    with pytest.raises(ValueError, match="leave positions='original'"):
        vtprune.patch(model, "cls_attention", keep=0.3, positions="contiguous")
    with pytest.raises(ValueError, match="is not patched"):
        vtprune.last_trace(model)
