"""Benchmark registry, scorers on hand-worked cases, and loaders on tiny local fixtures in each hub schema."""

import json

import datasets
import pytest
from PIL import Image
from vtprune.eval.benchmarks import BENCHMARKS, benchmark, names
from vtprune.eval.benchmarks.vqa_answers import normalize_answer, vqa_accuracy
from vtprune.eval.samples import Sample

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."


def picture(colour: str, mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (8, 8), colour)


def write_parquet(directory, columns: dict) -> str:
    """A one-file split in `directory`, as `datasets` writes it (images keep their image type)."""
    directory.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(columns).to_parquet(str(directory / "test-00000-of-00001.parquet"))
    return str(directory)


def make_sample(answer: str, group: str = "", **fields) -> Sample:
    return Sample(id="0", image=picture("white"), question="q", answers=(answer,), group=group, **fields)


# Registry


def test_registry_resolves_every_benchmark_to_its_name():
    for name in names():
        if name != "shapes":  # written separately; resolved lazily so this package does not depend on it
            assert benchmark(name).name == name
    assert names() == list(BENCHMARKS)


def test_unknown_benchmark_lists_the_known_ones():
    with pytest.raises(ValueError, match="known: vqav2, textvqa, gqa, pope, mme, scienceqa, mmbench, shapes"):
        benchmark("imagenet")


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="no split 'train'"):
        benchmark("pope").load(split="train")


def test_data_dir_without_data_files_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .parquet"):
        benchmark("pope").load(data_dir=str(tmp_path))


# VQA accuracy (VQAv2, TextVQA)


@pytest.mark.parametrize(
    ("answer", "normalized"),
    [
        ("Two.", "2"),
        ("a dog", "dog"),
        ("The Dog!", "dog"),
        ("ten apples", "10 apples"),
        ("none", "0"),
        ("dont", "don't"),
        ("yes, it isnt", "yes it isn't"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("black/white", "black white"),
        ("(left)", "left"),
        ("up - down", "up down"),
    ],
)
def test_vqa_answer_normalisation(answer, normalized):
    assert normalize_answer(answer) == normalized


@pytest.mark.parametrize(
    ("prediction", "answers", "accuracy"),
    [
        # 3 of 10 humans agree: holding out one of them leaves 2 matches (2/3), one of the others 3 (1): 0.9
        ("Red.", ["red"] * 3 + ["blue"] * 7, 0.9),
        # 2 agree: 2 subsets with 1 match (1/3), 8 with 2 (2/3): (2/3 + 16/3) / 10 = 0.6
        ("a dog", ["dog"] * 2 + ["cat"] * 8, 0.6),
        # 1 agrees: 9 subsets with 1 match: 9 * (1/3) / 10 = 0.3
        ("dog", ["dog"] + ["cat"] * 9, 0.3),
        ("two", ["2"] * 4 + ["3"] * 6, 1.0),
        ("horse", ["dog"] * 10, 0.0),
    ],
)
def test_vqa_accuracy_averages_the_ten_leave_one_out_subsets(prediction, answers, accuracy):
    assert vqa_accuracy(prediction, answers) == pytest.approx(accuracy)


def test_vqav2_loads_its_schema_and_scores_vqa_accuracy(tmp_path):
    human_answers = [{"answer": "2", "answer_confidence": "yes", "answer_id": i} for i in range(1, 4)]
    human_answers += [{"answer": "3", "answer_confidence": "maybe", "answer_id": i} for i in range(4, 11)]
    data_dir = write_parquet(
        tmp_path,
        {
            "question_type": ["how many", "is this"],
            "multiple_choice_answer": ["3", "yes"],
            "answers": [human_answers, [{"answer": "yes", "answer_confidence": "yes", "answer_id": 1}] * 10],
            "image_id": [7, 8],
            "answer_type": ["number", "yes/no"],
            "question_id": [70, 80],
            "question": ["How many dogs are there?", "Is this a park?"],
            "image": [picture("red"), picture("blue")],
        },
    )
    bench = benchmark("vqav2")
    samples = bench.load(data_dir=data_dir)
    assert [s.id for s in samples] == ["70", "80"]
    assert samples[0].answers == ("2",) * 3 + ("3",) * 7
    assert samples[0].group == "number"
    assert samples[0].image.getpixel((0, 0)) == (255, 0, 0)
    assert bench.prompt(samples[0]) == "How many dogs are there?" + SHORT_ANSWER
    assert bench.score(samples, ["Two", "Yes."]) == {
        "accuracy": pytest.approx(95.0),
        "accuracy/number": pytest.approx(90.0),
        "accuracy/yes/no": pytest.approx(100.0),
    }
    assert len(bench.load(data_dir=data_dir, limit=1)) == 1


def test_textvqa_loads_jsonl_with_image_paths_and_capitalises_its_prompt(tmp_path):
    (tmp_path / "images").mkdir()
    picture("green").save(tmp_path / "images" / "a.png")
    row = {
        "image_id": "a",
        "question_id": 5,
        "question": "what brand is the Camera?",
        "answers": ["nikon"] * 10,
        "image": "images/a.png",
        "ocr_tokens": ["NIKON"],
    }
    (tmp_path / "validation.jsonl").write_text(json.dumps(row) + "\n")
    bench = benchmark("textvqa")
    [sample] = bench.load(data_dir=str(tmp_path))
    assert sample.image.getpixel((0, 0)) == (0, 128, 0)
    assert bench.prompt(sample) == "What brand is the camera?" + SHORT_ANSWER
    assert bench.correct(sample, "Nikon.") == 1.0


# GQA


def test_gqa_joins_questions_to_images_and_scores_exact_match(tmp_path):
    types = {"structural": "verify", "semantic": "obj", "detailed": "existThat"}
    write_parquet(
        tmp_path / "testdev_balanced_instructions",
        {
            "id": ["201", "202"],
            "imageId": ["n2", "n1"],
            "question": ["Is there a t-shirt?", "Which side is the cup on?"],
            "answer": ["yes", "left"],
            "fullAnswer": ["Yes, there is a t-shirt.", "The cup is on the left."],
            "isBalanced": [True, True],
            "types": [types, {**types, "structural": "query"}],
        },
    )
    write_parquet(
        tmp_path / "testdev_balanced_images",
        {"id": ["n1", "n2", "n3"], "image": [picture("red"), picture("blue"), picture("green")]},
    )
    bench = benchmark("gqa")
    samples = bench.load(data_dir=str(tmp_path))
    assert [s.image.getpixel((0, 0)) for s in samples] == [(0, 0, 255), (255, 0, 0)]
    assert [s.group for s in samples] == ["verify", "query"]
    assert bench.prompt(samples[1]) == "Which side is the cup on?" + SHORT_ANSWER
    assert bench.correct(samples[0], "Yes.") == 1.0
    assert bench.correct(samples[1], "Left side") == 0.0
    assert bench.score(samples, ["yes", " LEFT! "]) == {
        "accuracy": 100.0,
        "accuracy/query": 100.0,
        "accuracy/verify": 100.0,
    }


# POPE


def test_pope_metrics_on_a_hand_computed_confusion_matrix_as_eval_pope_computes_them():
    # adversarial: 5 "yes" questions, answered Y Y Y Y N -> TP 4, FN 1
    # popular: 1 "yes" then 4 "no" questions, answered N Y N N N -> FN 1, FP 1, TN 3
    truths = ["yes"] * 5 + ["yes", "no", "no", "no", "no"]
    splits = ["adversarial"] * 5 + ["popular"] * 5
    predictions = ["Yes", "Yes", "Yes", "Yes", "No", "No", "Yes", "No", "No", "No"]
    samples = [make_sample(truth, split) for truth, split in zip(truths, splits, strict=True)]
    metrics = benchmark("pope", "official").score(samples, predictions)
    expected = {
        # overall: TP 4, FN 2, FP 1, TN 3
        "accuracy": 70.0,
        "precision": 80.0,
        "recall": 200 / 3,
        "f1": 2 * 0.8 * (2 / 3) / (0.8 + 2 / 3) * 100,
        "yes_ratio": 50.0,
        "accuracy/adversarial": 80.0,
        "precision/adversarial": 100.0,
        "recall/adversarial": 80.0,
        "f1/adversarial": 2 * 0.8 / 1.8 * 100,
        "yes_ratio/adversarial": 80.0,
        "accuracy/popular": 60.0,
        "precision/popular": 0.0,
        "recall/popular": 0.0,
        "f1/popular": 0.0,
        "yes_ratio/popular": 20.0,
    }
    assert metrics == pytest.approx(expected)


def test_pope_loads_its_schema(tmp_path):
    data_dir = write_parquet(
        tmp_path,
        {
            "id": ["0", "1"],
            "question_id": ["1", "1"],
            "question": ["Is there a dog in the image? ", "Is there a car in the image?"],
            "answer": ["yes", "No"],
            "image_source": ["COCO_val2014_000000310196", "COCO_val2014_000000210789"],
            "image": [picture("red"), picture("blue")],
            "category": ["adversarial", "popular"],
        },
    )
    bench = benchmark("pope")
    samples = bench.load(data_dir=data_dir)
    assert [s.id for s in samples] == ["adversarial/1", "popular/1"]
    assert [s.answers for s in samples] == [("yes",), ("no",)]
    assert bench.prompt(samples[0]) == "Is there a dog in the image?" + SHORT_ANSWER
    assert bench.correct(samples[1], " No ") == 1.0
    assert bench.correct(samples[1], "No, there is not.") == 0.0  # lmms-eval wants "no" exactly
    assert benchmark("pope", "official").correct(samples[1], "No, there is not.") == 1.0


# MME


def test_mme_acc_and_acc_plus_per_subtask_sum_into_perception_and_cognition():
    questions = [
        ("existence", "img1", "yes", "Yes"),
        ("existence", "img1", "no", "No."),
        ("existence", "img2", "yes", "yes, there is"),
        ("existence", "img2", "no", "yes"),  # wrong: img2 has one of its two questions right
        ("OCR", "img3", "yes", "Yes"),
        ("OCR", "img3", "no", "No"),
        ("code_reasoning", "img4", "yes", "maybe"),  # "other" is wrong either way
        ("code_reasoning", "img4", "no", "Yes"),
    ]
    samples = [make_sample(truth, subtask, extra={"image_id": image}) for subtask, image, truth, _ in questions]
    metrics = benchmark("mme").score(samples, [prediction for *_, prediction in questions])
    assert metrics == {
        "accuracy": 62.5,  # 5 of 8 questions
        "acc/OCR": 100.0,
        "acc+/OCR": 100.0,
        "acc/code_reasoning": 0.0,
        "acc+/code_reasoning": 0.0,
        "acc/existence": 75.0,  # 3 of 4 questions
        "acc+/existence": 50.0,  # 1 of 2 images
        "perception": 325.0,  # existence 75 + 50, OCR 100 + 100
        "cognition": 0.0,
    }


def test_mme_loads_its_schema_and_words_the_yes_no_instruction(tmp_path):
    data_dir = write_parquet(
        tmp_path,
        {
            "question_id": ["existence/000000006040.jpg"] * 2,
            "image": [picture("red", "RGBA")] * 2,
            "question": [
                "Is there a train in this image? Please answer yes or no.",
                "Is there a bed in this image? Please answer yes or no.",
            ],
            "answer": ["Yes", "No"],
            "category": ["existence"] * 2,
        },
    )
    bench = benchmark("mme")
    samples = bench.load(data_dir=data_dir)
    assert [s.id for s in samples] == ["existence/000000006040.jpg#0", "existence/000000006040.jpg#1"]
    assert samples[0].question == "Is there a train in this image?"
    assert samples[0].image.mode == "RGB"
    assert bench.prompt(samples[0]) == "Is there a train in this image?" + SHORT_ANSWER
    assert bench.score(samples, ["Yes", "No"])["perception"] == 200.0


# Multiple choice (ScienceQA, MMBench)


def test_scienceqa_loads_its_schema_with_the_hint_as_context(tmp_path):
    data_dir = write_parquet(
        tmp_path,
        {
            "image": [picture("red"), picture("blue")],
            "question": ["Which is a mammal?", "Which word is a noun?"],
            "choices": [["frog", "whale"], ["run", "table", "blue"]],
            "answer": [1, 1],
            "hint": ["Whales live in the sea.", ""],
            "task": ["closed choice"] * 2,
            "grade": ["grade3", "grade2"],
            "subject": ["natural science", "language science"],
            "topic": ["biology", "grammar"],
            "category": ["Classification", "Parts of speech"],
            "skill": ["Identify mammals", "Identify nouns"],
            "lecture": ["", ""],
            "solution": ["", ""],
        },
    )
    bench = benchmark("scienceqa")
    samples = bench.load(data_dir=data_dir)
    assert [(s.id, s.answers, s.choices) for s in samples] == [
        ("0", ("B",), ("frog", "whale")),
        ("1", ("B",), ("run", "table", "blue")),
    ]
    assert (
        bench.prompt(samples[0])
        == "Context: Whales live in the sea.\nWhich is a mammal?\nA. frog\nB. whale" + LETTER_ANSWER
    )
    assert bench.prompt(samples[1]) == "Which word is a noun?\nA. run\nB. table\nC. blue" + LETTER_ANSWER
    assert bench.score(samples, ["B", "The answer is C."]) == {
        "accuracy": 50.0,
        "accuracy/language science": 0.0,
        "accuracy/natural science": 100.0,
    }


def mmbench_rows(indices, options, answers, hints, categories):
    return {
        "index": indices,
        "question": [f"Question {index % 1_000_000}?" for index in indices],
        "hint": hints,
        "A": [choice[0] for choice in options],
        "B": [choice[1] for choice in options],
        "C": [choice[2] for choice in options],
        "D": [choice[3] for choice in options],
        "answer": answers,
        "category": categories,
        "image": [picture("red") for _ in indices],
        "source": ["MMBench"] * len(indices),
        "L2-category": ["perception"] * len(indices),
        "comment": ["nan"] * len(indices),
        "split": ["dev"] * len(indices),
    }


def test_mmbench_rotates_options_and_scores_circularly(tmp_path):
    data_dir = write_parquet(
        tmp_path,
        mmbench_rows(
            indices=[0, 1],
            options=[("cat", "dog", "bird", None), ("yes", "no", None, None)],
            answers=["B", "A"],
            hints=["Look at the animal.", "nan"],
            categories=["animals", "colors"],
        ),
    )
    bench = benchmark("mmbench")
    samples = bench.load(data_dir=data_dir)
    assert [(s.id, s.choices, s.answers[0]) for s in samples] == [
        ("0", ("cat", "dog", "bird"), "B"),
        ("1", ("yes", "no"), "A"),
        ("1000000", ("dog", "bird", "cat"), "A"),
        ("2000000", ("bird", "cat", "dog"), "C"),
        ("1000001", ("no", "yes"), "B"),
    ]
    assert bench.prompt(samples[0]) == (
        "Look at the animal. Question 0? There are several options:\nA. cat\nB. dog\nC. bird\n" + LETTER_ANSWER
    )
    assert bench.prompt(samples[1]).startswith("Question 1? There are several options:\nA. yes")
    # Question 0 is right under all 3 rotations; question 1 only unrotated.
    metrics = bench.score(samples, ["B", "A", "A", "dog", "A"])
    assert metrics == {"accuracy": 50.0, "accuracy/animals": 100.0, "accuracy/colors": 0.0, "single_pass": 100.0}


def test_mmbench_keeps_rotated_copies_the_dataset_already_has(tmp_path):
    data_dir = write_parquet(
        tmp_path,
        mmbench_rows(
            indices=[3, 1_000_003],
            options=[("red", "blue", None, None), ("blue", "red", None, None)],
            answers=["A", "B"],
            hints=[None, None],
            categories=["colors"] * 2,
        ),
    )
    bench = benchmark("mmbench")
    samples = bench.load(data_dir=data_dir)
    assert [s.id for s in samples] == ["3", "1000003"]
    assert bench.score(samples, ["A", "A"])["accuracy"] == 0.0
    assert bench.score(samples, ["A", "red"])["accuracy"] == 100.0
