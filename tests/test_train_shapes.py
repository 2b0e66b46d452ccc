"""The `vtprune-shapes` training inputs: full rows are what the processor makes at inference, sparse rows keep
the objects at their positions, and the attention targets mark the evidence's image tokens and the cue words."""

import math

import numpy as np
import pytest
import torch
from vtprune.eval import shapes, train_shapes


@pytest.fixture(scope="module")
def built():
    return train_shapes.build(seed=0)


def batch_for(built, index: int, background: int | None):
    model, processor = built
    seed = shapes.seed_of("train", index)
    return (*train_shapes.question_batch(model, processor, [seed], np.random.default_rng(0), background), seed)


def test_a_full_row_is_the_processors_prompt_with_its_answer(built):
    _, processor = built
    inputs, asking, _, seed = batch_for(built, 0, None)
    scene, query = shapes.generate(seed)
    text = shapes.PROMPT_TEMPLATE.format(question=query.text) + f" {query.answer(scene.items)} </s>"
    expected = processor(images=shapes.draw(scene), text=text, return_tensors="pt")["input_ids"][0]
    assert torch.equal(inputs["input_ids"][0, : len(expected)], expected)
    assert inputs["labels"][0, asking[0] + 1] == expected[-2]  # the answer word follows the asking token


@pytest.mark.parametrize("background", [None, 12])
def test_attention_targets_mark_the_evidence_and_the_cue_words(built, background):
    model, processor = built
    inputs, asking, focus, seed = batch_for(built, 3, background)
    scene, _ = shapes.generate(seed)
    image = inputs["input_ids"] == model.config.image_token_id
    start = int(image[0].nonzero()[0])
    by_text = {question.text: question for question in shapes.questions(scene.items)}
    for row in range(len(image)):
        last_image = int(image[row].nonzero()[-1])
        words = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][row, last_image + 1 : asking[row] - 1])
        question = by_text[" ".join(words)]
        cells = inputs["position_ids"][row][image[row]] - start
        evidence = {item.cell for item in question.evidence(scene.items)}
        for layer in train_shapes.EVIDENCE_LAYERS:
            assert cells[focus[layer][row][image[row]]].tolist() == sorted(evidence)
            assert not focus[layer][row][~image[row]].any()
        words = processor.tokenizer.convert_ids_to_tokens(
            inputs["input_ids"][row][focus[train_shapes.CUE_LAYERS[0]][row]]
        )
        assert sorted(words) == sorted(train_shapes.cues(question))
        assert asking[row] == int(inputs["attention_mask"][row].sum()) - 3
    if background is not None:
        objects = len(scene.items)
        assert image.sum(1).tolist() == [objects + background] * len(image)


@pytest.mark.parametrize(
    ("query", "words"),
    [
        (shapes.Query("colour", shape="circle"), ["circle"]),
        (shapes.Query("shape", colour="blue"), ["blue"]),
        (shapes.Query("position", colour="blue"), ["blue"]),
        (shapes.Query("count", shape="circle"), ["circles"]),
        (shapes.Query("exists", colour="green", shape="square"), ["green", "square"]),
    ],
)
def test_cues_name_what_to_look_up(query, words):
    assert sorted(train_shapes.cues(query)) == sorted(words)
    assert set(words) <= set(query.text.split())


def test_attention_loss_is_minus_the_log_attention_to_the_marked_tokens(monkeypatch):
    monkeypatch.setattr(train_shapes, "CUE_LAYERS", (0,))
    monkeypatch.setattr(train_shapes, "CUE_HEADS", 2)
    attention = torch.zeros(2, 3, 3, 4)  # rows, heads, queries, keys
    attention[0, :, 2] = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.3, 0.4, 0.1, 0.2], [1.0, 0.0, 0.0, 0.0]])
    attention[1, :, 1] = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    asking = torch.tensor([2, 1])
    marked = torch.tensor([[False, True, True, False], [True, False, False, False]])
    loss = train_shapes.attention_loss((attention, attention), asking, {0: marked, 1: marked})
    # Cue layer 0, heads 0 and 1 only: row 0 pays 0.3 + 0.2 to keys 1 and 2, row 1 pays 0.5 to key 0.
    cue = -(math.log(0.5) + math.log(0.5)) / 2
    # Layer 1, all three heads: row 0 pays (0.5 + 0.5 + 0) / 3, row 1 pays (0.5 + 0.5 + 0) / 3.
    evidence = -(math.log(1 / 3) + math.log(1 / 3)) / 2
    assert loss.item() == pytest.approx((cue + evidence) / 2)
