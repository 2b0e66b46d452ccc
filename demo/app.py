"""`vtprune demo`: a Gradio app that answers a question about a picture (or a video, with the video extra)
unpruned and under each chosen policy, and shows which visual tokens each kept.

    vtprune demo [--model NAME] [--port 7860] [--host 127.0.0.1] [--share]
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image
from vtprune.eval import shapes
from vtprune.eval.runner import EMBEDDED, ModelError

import vtprune

from .inference import Answer, Models, Video, ask

EXAMPLES = 4
"""`shapes` test scenes offered as examples, one of each of the first question kinds."""
PERCENT, TOKENS = "% of tokens", "tokens"
HEADERS = ("setting", "answer", "visual tokens", "first token (ms)", "total (ms)")
VIDEO = importlib.util.find_spec("decord") is not None
"""Whether the app offers video upload: `load_video` needs decord (`pip install "vtprune[video]"`)."""
FRAMES = 8
"""Frames sampled from an uploaded video, evenly over its length, unless the page asks for another count."""


def compare(
    models: Models,
    model_name: str,
    image: Image.Image | None,
    video: str | None,
    frames: int,
    question: str,
    policies: list[str],
    budget: float,
    unit: str,
    heatmap: bool,
) -> tuple[str, list[tuple[Image.Image, str]], list[list[Any]]]:
    """The app's one action: (status message, pictures with captions, table rows). A video, where one is given,
    is asked about instead of the picture (`frames` of it, sampled evenly). Bad input gives a message saying
    what to change, and nothing else."""
    if image is None and not video:
        return "Upload a picture or a video (or pick an example) first.", [], []
    if not question.strip():
        return "Type a question about the picture.", [], []
    if not policies:
        return "Pick at least one policy.", [], []
    keep = budget / 100 if unit == PERCENT else int(budget)
    try:
        media = Video(*vtprune.load_video(video, num_frames=int(frames), with_metadata=True)) if video else image
        model, processor = models.get(model_name)
        answers = [ask(model, processor, media, question, None, None)]
        answers += [ask(model, processor, media, question, policy, keep) for policy in policies]
    except (ModelError, ValueError, TypeError, ImportError) as error:
        return f"**Cannot run this:** {error}", [], []
    return _status(answers), [_captioned(one, heatmap) for one in answers], [_row(one) for one in answers]


def _status(answers: list[Answer]) -> str:
    full = answers[0]
    return f"Unpruned answer: **{full.text}** ({full.summary})"


def _captioned(answer: Answer, heatmap: bool) -> tuple[Image.Image, str]:
    picture = answer.heatmap if heatmap and answer.heatmap is not None else answer.picture
    return picture, f"{answer.policy}: {answer.text} · {answer.summary}"


def _row(answer: Answer) -> list[Any]:
    return [
        answer.policy,
        answer.text,
        f"{answer.tokens_before} -> {answer.tokens_after}",
        round(1000 * answer.first_token_s),
        round(1000 * answer.total_s),
    ]


def examples(folder: Path) -> list[list[str]]:
    """The first `shapes` test scenes as PNG files in `folder`, each with its question."""
    rows = []
    for index in range(EXAMPLES):
        sample = shapes.sample("test", index)
        path = folder / f"{sample.id}.png"
        sample.image.save(path)
        rows.append([str(path), sample.question])
    return rows


def build(models: Models | None = None, model_name: str = EMBEDDED):
    """The Gradio app (not launched)."""
    import gradio as gr

    models = models or Models()
    policies = sorted(vtprune.policies())
    with gr.Blocks(title="vtprune: which visual tokens survive") as app:
        gr.Markdown("# vtprune\nAsk about a picture or a video: which visual tokens each policy keeps, at what cost.")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="pil", label="Picture", elem_id="picture", height=320)
                with gr.Row(visible=VIDEO):
                    video = gr.Video(
                        label="or a video (asked about instead)", sources=["upload"], elem_id="video", height=200
                    )
                    frames = gr.Slider(2, 32, value=FRAMES, step=1, label="Video frames", elem_id="frames")
                question = gr.Textbox(label="Question", elem_id="question")
                model = gr.Textbox(value=model_name, label="Model (hub name or local directory)", elem_id="model")
                chosen = gr.CheckboxGroup(policies, value=["cls_attention"], label="Policies", elem_id="policies")
                with gr.Row():
                    budget = gr.Slider(1, 100, value=25, step=1, label="Budget", elem_id="budget")
                    unit = gr.Radio([PERCENT, TOKENS], value=PERCENT, label="Budget in", elem_id="unit")
                heatmap = gr.Checkbox(label="Show scores as a heatmap", elem_id="heatmap")
                run = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="status")
                gallery = gr.Gallery(label="Kept tokens", columns=3, elem_id="gallery", type="pil")
                table = gr.Dataframe(headers=list(HEADERS), label="Answers and costs", elem_id="table")
        gr.Examples(examples(Path(tempfile.mkdtemp(prefix="vtprune-demo-"))), inputs=[image, question])

        def action(*values):
            return compare(models, *values)

        inputs = [model, image, video, frames, question, chosen, budget, unit, heatmap]
        run.click(action, inputs, [status, gallery, table])
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vtprune demo", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=EMBEDDED, help=f"model the app starts with (default: {EMBEDDED})")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="a public Gradio link (needs the internet)")
    args = parser.parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError as error:
        raise SystemExit("the demo needs Gradio: pip install 'vtprune[demo]'") from error
    build(model_name=args.model).launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0
