"""The `shapes` benchmark: determinism, splits, answers and scoring."""

from __future__ import annotations

import pytest
from vtprune.eval import shapes
from vtprune.eval.samples import Sample


def item(colour: str, shape: str, x: int, y: int = 84, size: int = 30) -> shapes.Item:
    return shapes.Item(colour, shape, x, y, size)


SCENE = (
    item("red", "triangle", 30, 30),
    item("blue", "circle", 130, 30),
    item("green", "circle", 80, 90),
    item("yellow", "square", 30, 140),
    item("purple", "cross", 130, 140),
)
"""A hand-made scene: circles at the top right and in the middle, the others in the corners."""


def overlap(a: shapes.Item, b: shapes.Item) -> bool:
    (al, at, ar, ab), (bl, bt, br, bb) = a.box, b.box
    return al < br and bl < ar and at < bb and bt < ab


def test_samples_are_determined_by_split_and_index():
    first, again = shapes.sample("test", 42), shapes.sample("test", 42)
    assert first.image.tobytes() == again.image.tobytes()
    assert (first.id, first.question, first.answers, first.group) == (
        again.id,
        again.question,
        again.answers,
        again.group,
    )
    assert first.id == "test-00042"
    assert shapes.render(first.extra["seed"]).tobytes() == first.image.tobytes()
    assert first.image.size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
    assert [s.question for s in shapes.Shapes().load(limit=3)] == [shapes.sample("test", i).question for i in range(3)]


def test_splits_draw_from_disjoint_seeds():
    last_test = shapes.seed_of("test", shapes.SPLIT_SIZES["test"] - 1)
    assert last_test < shapes.seed_of("train", 0)
    with pytest.raises(ValueError, match="outside"):
        shapes.seed_of("test", shapes.SPLIT_SIZES["test"])
    with pytest.raises(ValueError, match="unknown split"):
        shapes.seed_of("validation", 0)
    test, train = shapes.sample("test", 7), shapes.sample("train", 7)
    assert test.image.tobytes() != train.image.tobytes()


def test_questions_cover_every_kind_and_are_unambiguous():
    samples = shapes.Shapes().load("test", limit=50)
    assert {s.group for s in samples} == set(shapes.KINDS)
    exists = [s.answers[0] for s in samples if s.group == "exists"]
    assert exists.count("yes") == exists.count("no")
    for one in samples:
        scene, query = shapes.generate(one.extra["seed"])
        assert query.answer(scene.items) == one.answers[0] in shapes.ANSWERS
        assert set(one.question.split()) <= set(shapes.WORDS)
        assert shapes.OBJECTS[0] <= len(scene.items) <= shapes.OBJECTS[1]
        assert not any(overlap(a, b) for i, a in enumerate(scene.items) for b in scene.items[i + 1 :])


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
        (shapes.Query("position", colour="red", shape="triangle", other=("blue", "circle")), "left"),
        (shapes.Query("position", colour="purple", shape="cross", other=("green", "circle")), "right"),
    ],
)
def test_answers_for_a_hand_made_scene(query, answer):
    assert query.answer(SCENE) == answer


@pytest.mark.parametrize(
    "query",
    [
        shapes.Query("colour", shape="circle"),  # two circles
        shapes.Query("shape", colour="orange"),  # nothing is orange
        shapes.Query("position", colour="red", shape="triangle", other=("yellow", "square")),  # same x
    ],
)
def test_ambiguous_questions_are_refused(query):
    with pytest.raises(ValueError):
        query.answer(SCENE)


def test_question_wording():
    assert shapes.Query("count", shape="cross").text == "how many crosses are there ?"
    position = shapes.Query("position", colour="red", shape="circle", other=("blue", "square"))
    assert position.text == "is the red circle left or right of the blue square ?"


def test_score_breaks_accuracy_down_by_kind():
    bench = shapes.Shapes()

    def one(kind: str, answer: str) -> Sample:
        return Sample(id=f"{kind}-{answer}", image=None, question="", answers=(answer,), group=kind)

    samples = [one("colour", "red"), one("colour", "blue"), one("count", "2"), one("exists", "no")]
    predictions = ["Red.", "green", " 2 ", "no!"]
    assert [bench.correct(s, p) for s, p in zip(samples, predictions, strict=True)] == [1.0, 0.0, 1.0, 1.0]
    assert bench.score(samples, predictions) == {
        "accuracy": 75.0,
        "accuracy/colour": 50.0,
        "accuracy/count": 100.0,
        "accuracy/exists": 100.0,
    }
    assert bench.prompt(samples[0]) == samples[0].question
