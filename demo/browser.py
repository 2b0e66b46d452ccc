"""Drive the demo in a real headless Chromium (Playwright), as a person would: upload a picture or a video,
ask, run, and read what the page shows. The browser test uses it, and so does the README's screenshot:

    python -m vtprune.demo.browser docs/demo.png [--model NAME]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vtprune.eval import shapes
from vtprune.eval.runner import EMBEDDED

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
TIMEOUT_MS = 120_000
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi")


@dataclass(frozen=True)
class Page:
    """What the page showed after a run."""

    status: str
    captions: list[str]
    pictures: int
    """Images in the results gallery."""


def chromium() -> str | None:
    """The Chromium to drive: `$VTPRUNE_CHROMIUM`, else Debian's `chromium` on the PATH."""
    return os.environ.get("VTPRUNE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def served(app: Any):
    """The Gradio app served on a free localhost port for the `with` block; yields its URL."""
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


def drive(url: str, media: Path, question: str, screenshot: Path | None = None) -> Page:
    """Upload `media` (a picture, or a video by its suffix), type `question`, press Run with the default policy
    and budget, wait for the answer and the overlays, and read them; optionally save a screenshot of the page."""
    from playwright.sync_api import sync_playwright

    executable = chromium()
    if executable is None:
        raise RuntimeError("no Chromium found: apt-get install chromium, or set VTPRUNE_CHROMIUM")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            upload = "#video" if media.suffix.lower() in VIDEO_SUFFIXES else "#picture"
            page.locator(f"{upload} input[type=file]").set_input_files(str(media))
            page.locator("#question textarea").fill(question)
            page.locator("#run").click()
            page.locator("#status", has_text="Unpruned answer").wait_for()
            page.locator("#gallery img").first.wait_for()
            found = Page(
                status=page.locator("#status").inner_text(),
                captions=page.locator("#gallery .caption-label").all_inner_texts(),
                pictures=page.locator("#gallery img").count(),
            )
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
            return found
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Screenshot the demo answering a `shapes` test question.")
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument("--index", type=int, default=0, help="which `shapes` test sample to ask about")
    parser.add_argument("--model", default=EMBEDDED, help=f"model the app runs (default: {EMBEDDED})")
    args = parser.parse_args(argv)
    from .app import build

    sample = shapes.sample("test", args.index)
    with tempfile.TemporaryDirectory() as folder:
        picture = Path(folder) / f"{sample.id}.png"
        sample.image.save(picture)
        with served(build(model_name=args.model)) as url:
            page = drive(url, picture, sample.question, screenshot=args.out)
    print(page.status)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
