"""Where each visual token of an image comes from, in the picture's own pixels.

An image's visual tokens are one or more panels, each a grid of tokens over a region of the picture:

- LLaVA-1.5: one grid over what the image processor keeps: the centre square after a CLIP resize and
  crop, the whole picture for a processor that resizes to a square (SigLIP), the picture padded to a
  square for one that pads (`do_pad`).
- LLaVA-NeXT: the base crop (the whole picture squeezed to a square), then the tile mosaic over the whole
  picture once its padding is dropped, each mosaic row ending with a newline token that covers nothing.
- LLaVA-OneVision: a single image per prompt as on LLaVA-NeXT, its mosaic the interpolated one where the
  model shrank it; an image of a multi-image prompt only the base crop. A video has one grid of pooled
  tokens over the whole frame per frame. An item whose last grid has no row ends (a base crop alone, a
  video) ends with one newline token that covers nothing.
- Qwen2/2.5/3-VL, GLM-4.1V/4.5V: one grid of 2x2 merge units over the whole picture (the processor
  resizes, it does not crop); a video has one such grid per frame group.
- InternVL: one grid per tile over its part of the picture (the processor resizes the picture to its tile
  mosaic and cuts it), tiles in raster order, then the thumbnail's over the whole picture; a picture given
  as one tile is one grid over the whole of it.
- Gemma 3: one grid of pooled windows over the whole picture (the processor resizes it to a square).
"""

from __future__ import annotations

from dataclasses import dataclass

QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe")
"""Model types with Qwen-VL's packed tower: one grid of merge units per picture or frame group."""
ONEVISION_TYPES = ("llava_onevision",)
LLAVA_NEXT_TYPES = ("llava_next", *ONEVISION_TYPES)
"""Model types whose images are a base crop, then a tile mosaic with newline-ended rows."""


@dataclass(frozen=True)
class Panel:
    """A grid of visual tokens over one region of the picture."""

    name: str
    first: int
    """Index of the panel's first token among the image's visual tokens."""
    grid: tuple[int, int]
    """(rows, cols) of tokens."""
    region: tuple[float, float, float, float]
    """(left, top, right, bottom) in the picture's pixels; it may reach past the picture where it was padded."""
    row_stride: int
    """Tokens from one row's start to the next: `cols`, or `cols + 1` where each row ends with a newline."""

    @property
    def last(self) -> int:
        """One past the index of the panel's last token (its last newline included)."""
        return self.first + self.grid[0] * self.row_stride

    def boxes(self) -> dict[int, tuple[float, float, float, float]]:
        """Each token's index among the image's visual tokens -> its (left, top, right, bottom) in pixels."""
        rows, cols = self.grid
        left, top, right, bottom = self.region
        width, height = (right - left) / cols, (bottom - top) / rows
        return {
            self.first + row * self.row_stride + col: (
                left + col * width,
                top + row * height,
                left + (col + 1) * width,
                top + (row + 1) * height,
            )
            for row in range(rows)
            for col in range(cols)
        }


def processed_region(image_processor, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The part of a `size` (width, height) picture that a LLaVA-1.5 image processor hands the tower."""
    width, height = size
    if getattr(image_processor, "do_pad", False):
        side = max(width, height)
        return ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    if getattr(image_processor, "do_center_crop", False):
        side = min(width, height)
        return ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    return (0.0, 0.0, float(width), float(height))


def panels(
    model_type: str,
    grid: tuple[int, int],
    size: tuple[int, int],
    tokens: int,
    *,
    crop_grid: tuple[int, int] | None = None,
    image_processor=None,
    frames: int | None = None,
    tiles: tuple[int, int] | None = None,
) -> list[Panel]:
    """The panels of one image's visual tokens.

    `grid` is the trace's (rows, cols) for the image (LLaVA-NeXT and OneVision: its tile mosaic, interpolated
    where the model shrank it, newlines not counted; a video: one frame's, or one frame group's);
    `size` the picture's (width, height); `tokens` the image's visual tokens (the trace's `n_before`);
    `crop_grid` the base crop's grid of LLaVA-NeXT and OneVision images; `image_processor` LLaVA-1.5's, for
    the region it keeps; `frames` a video's frames (Qwen: frame groups); `tiles` InternVL's (rows, cols) of
    tiles, each of `crop_grid` tokens. A trailing newline (OneVision) is in `tokens` but in no panel."""
    width, height = size
    whole = (0.0, 0.0, float(width), float(height))
    rows, cols = grid
    if frames or model_type in QWEN_TYPES:
        label = "frame" if model_type in ONEVISION_TYPES else "frames"
        found = [
            Panel(f"{label} {index + 1}" if frames else "image", index * rows * cols, grid, whole, cols)
            for index in range(frames or 1)
        ]
    elif tiles is not None and tiles != (1, 1):
        if crop_grid is None:
            raise ValueError(f"{model_type} tile panels need a tile's grid (crop_grid)")
        tile_rows, tile_cols = tiles
        size = crop_grid[0] * crop_grid[1]
        found = [
            Panel(
                f"tile {row * tile_cols + col + 1}",
                (row * tile_cols + col) * size,
                crop_grid,
                (
                    col * width / tile_cols,
                    row * height / tile_rows,
                    (col + 1) * width / tile_cols,
                    (row + 1) * height / tile_rows,
                ),
                crop_grid[1],
            )  # fmt: skip
            for row in range(tile_rows)
            for col in range(tile_cols)
        ]
        found.append(Panel("thumbnail", tile_rows * tile_cols * size, crop_grid, whole, crop_grid[1]))
    elif model_type in LLAVA_NEXT_TYPES:
        if crop_grid is None:
            raise ValueError(f"{model_type} panels need the base crop's grid (crop_grid)")
        base = Panel("base", 0, crop_grid, whole, crop_grid[1])
        tiles = Panel("tiles", base.last, grid, whole, cols + 1)
        found = [base] if tokens == _end(model_type, [base]) else [base, tiles]
    else:
        region = whole if image_processor is None else processed_region(image_processor, size)
        found = [Panel("image", 0, grid, region, cols)]
    end = _end(model_type, found)
    if end != tokens:
        raise ValueError(
            f"a {model_type} image of {tokens} visual tokens does not fit panels of {end}; "
            "pass the trace's grid and n_before for this image"
        )
    return found


def _end(model_type: str, found: list[Panel]) -> int:
    """One past the last of the item's tokens: its last panel's, and OneVision's closing newline where that
    panel's rows have no newlines of their own (a base crop alone, a video's frames)."""
    last = found[-1]
    closing = model_type in ONEVISION_TYPES and last.row_stride == last.grid[1]
    return last.last + int(closing)
