"""The `shapes` benchmark: determinism, splits, answers and scoring."""

from __future__ import annotations

from collections import Counter

import pytest
from vtprune.eval import shapes
from vtprune.eval.samples import Sample


def item(colour: str, shape: str, column: int, row: int) -> shapes.Item:
    """A 10-pixel object in the middle of a cell."""
    return shapes.Item(colour, shape, x=column * shapes.CELL + 7, y=row * shapes.CELL + 7, size=10)


SCENE = (
    item("red", "triangle", 1, 1),
    item("blue", "circle", 10, 1),
    item("green", "circle", 6, 6),
    item("yellow", "square", 1, 10),
    item("purple", "cross", 10, 10),
)
"""A hand-made scene: two circles (top right, middle), the other shapes in the corners."""


def test_samples_are_determined_by_split_and_index():
    first, again = shapes.sample("test", 42), shapes.sample("test", 42)
    assert first.image.tobytes() == again.image.tobytes()
    assert (first.question, first.answers, first.group) == (again.question, again.answers, again.group)
    assert first.id == "test-00042"
    assert first.image.size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
    assert shapes.render(first.extra["seed"]).tobytes() == first.image.tobytes()
    assert [s.question for s in shapes.Shapes().load(limit=3)] == [shapes.sample("test", i).question for i in range(3)]


def test_splits_draw_from_disjoint_seeds():
    assert shapes.seed_of("test", shapes.SPLIT_SIZES["test"] - 1) < shapes.seed_of("train", 0)
    with pytest.raises(ValueError, match="outside"):
        shapes.seed_of("test", shapes.SPLIT_SIZES["test"])
    with pytest.raises(ValueError, match="unknown split"):
        shapes.seed_of("validation", 0)
    assert shapes.sample("test", 7).image.tobytes() != shapes.sample("train", 7).image.tobytes()


def test_generated_questions_are_unambiguous_and_balanced():
    samples = shapes.Shapes().load("test", limit=40)
    assert Counter(s.group for s in samples) == {kind: 8 for kind in shapes.KINDS}
    answers = {kind: Counter(s.answers[0] for s in samples if s.group == kind) for kind in shapes.KINDS}
    assert answers["count"] == {"1": 2, "2": 2, "3": 2, "4": 2}
    assert answers["exists"] == {"yes": 4, "no": 4}
    assert answers["position"] == {"left": 4, "right": 4}
    for one in samples:
        scene, query = shapes.generate(one.extra["seed"])
        assert query.answer(scene.items) == one.answers[0] in shapes.ANSWERS
        assert set(one.question.split()) <= set(shapes.WORDS)
        assert shapes.OBJECTS[0] <= len(scene.items) <= shapes.OBJECTS[1]
        assert len({i.cell for i in scene.items}) == len(scene.items)  # one object per patch
        for i in scene.items:
            left, top, right, bottom = i.box
            assert (left // shapes.CELL, top // shapes.CELL) == (
                (right - 1) // shapes.CELL,
                (bottom - 1) // shapes.CELL,
            )


def test_exists_no_scenes_hold_both_lures():
    for one in shapes.Shapes().load("test", limit=40):
        if one.group == "exists" and one.answers == ("no",):
            scene, query = shapes.generate(one.extra["seed"])
            assert any(i.colour == query.colour for i in scene.items)
            assert any(i.shape == query.shape for i in scene.items)


@pytest.mark.parametrize(
    ("query", "answer"),
    [
        (shapes.Query("colour", shape="triangle"), "red"),
        (shapes.Query("colour", shape="cross"), "purple"),
        (shapes.Query("shape", colour="green"), "circle"),
        (shapes.Query("shape", colour="yellow"), "square"),
        (shapes.Query("count", shape="circle"), "2"),
        (shapes.Query("count", shape="square"), "1"),
        (shapes.Query("exists", colour="blue", shape="circle"), "yes"),
        (shapes.Query("exists", colour="blue", shape="square"), "no"),
        (shapes.Query("position", colour="red"), "left"),
        (shapes.Query("position", colour="purple"), "right"),
    ],
)
def test_answers_for_a_hand_made_scene(query, answer):
    assert query.answer(SCENE) == answer
    assert query in shapes.questions(SCENE)


@pytest.mark.parametrize(
    ("query", "evidence"),
    [
        (shapes.Query("colour", shape="triangle"), ["red triangle"]),
        (shapes.Query("shape", colour="green"), ["green circle"]),
        (shapes.Query("count", shape="circle"), ["blue circle", "green circle"]),
        (shapes.Query("exists", colour="blue", shape="circle"), ["blue circle"]),
        (shapes.Query("exists", colour="blue", shape="square"), ["blue circle", "yellow square"]),  # the lures
        (shapes.Query("position", colour="purple"), ["purple cross"]),
    ],
)
def test_evidence_is_the_objects_the_answer_rests_on(query, evidence):
    assert [f"{item.colour} {item.shape}" for item in query.evidence(SCENE)] == evidence


@pytest.mark.parametrize(
    "query",
    [
        shapes.Query("colour", shape="circle"),  # two circles
        shapes.Query("shape", colour="orange"),  # nothing is orange
        shapes.Query("position", colour="green"),  # in the middle
    ],
)
def test_ambiguous_questions_are_refused(query):
    with pytest.raises(ValueError):
        query.answer(SCENE)
    assert query not in shapes.questions(SCENE)


def test_question_wording():
    assert shapes.Query("colour", shape="cross").text == "what colour is the cross ?"
    assert shapes.Query("count", shape="cross").text == "how many crosses are there ?"
    assert shapes.Query("exists", colour="red", shape="cross").text == "is there a red cross ?"
    assert shapes.Query("position", colour="red").text == "on which side is the red object ?"


def test_score_breaks_accuracy_down_by_kind():
    bench = shapes.Shapes()

    def one(kind: str, answer: str) -> Sample:
        return Sample(id=f"{kind}-{answer}", image=None, question=f"{kind} ?", answers=(answer,), group=kind)

    samples = [one("colour", "red"), one("colour", "blue"), one("count", "2"), one("exists", "no")]
    predictions = ["Red.", "green", " 2 ", "no!"]
    assert [bench.correct(s, p) for s, p in zip(samples, predictions, strict=True)] == [1.0, 0.0, 1.0, 1.0]
    assert bench.score(samples, predictions) == {
        "accuracy": 75.0,
        "accuracy/colour": 50.0,
        "accuracy/count": 100.0,
        "accuracy/exists": 100.0,
    }
    assert bench.prompt(samples[0]) == "colour ?"
