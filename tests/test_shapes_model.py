"""The embedded `vtprune-shapes` model: it loads through `from_pretrained` from the package and answers the
`shapes` test split, unpruned well and randomly pruned worse."""

from __future__ import annotations

import contextlib
import functools

from vtprune.eval import shapes

import vtprune

MODEL_SAMPLES = 200


@functools.cache
def model_and_samples():
    model, processor = shapes.load_model()
    return model, processor, shapes.Shapes().load("test", limit=MODEL_SAMPLES)


@functools.cache
def accuracy(policy: str | None = None, keep: float | None = None) -> float:
    model, processor, samples = model_and_samples()
    with vtprune.patched(model, policy, keep=keep) if policy else contextlib.nullcontext():
        return shapes.Shapes().score(samples, shapes.predict(model, processor, samples))["accuracy"]


def test_embedded_model_loads_from_the_packaged_directory():
    model, processor, _ = model_and_samples()
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.vision_config.model_type == "clip_vision_model"
    assert set(shapes.WORDS) <= set(processor.tokenizer.get_vocab())
    prompt = shapes.PROMPT_TEMPLATE.format(question="what colour is the cross ?")
    inputs = processor(images=shapes.render(0), text=prompt, return_tensors="pt")
    grid = shapes.IMAGE_SIZE // model.config.vision_config.patch_size
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == grid * grid


def test_embedded_model_answers_unpruned():
    assert accuracy() >= 90.0


def test_random_pruning_costs_accuracy():
    assert accuracy("random", 0.11) < accuracy() - 20
