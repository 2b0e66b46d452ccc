"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): LLaVA-NeXT's anyres images, interpolated when large,
and pooled video frames.

Images: a single image per prompt is a base crop and tiles as on LLaVA-NeXT, but a tile mosaic larger than
`vision_aspect_ratio` allows (`anyres_max_9`: 9 crops' worth) is bilinearly interpolated down after the
tower, and an image of a multi-image prompt is only its base crop, plus one newline. Videos: each frame is
one crop, its projected tokens bilinearly pooled to half the rows and columns, and one newline ends the
video. Either way an LLM token may mix several crop tokens. vtprune selects in the LLM's token space: such
tokens form one group per interpolated mosaic or frame (or per video, with `temporal="joint"`), each
scored by the same interpolation of its sources' signals, with their grid; the trace's `kept` numbers
them as the processor placed them. Which crop tokens (and weights) make each LLM token is read off the
model's own `pack_image_features` and `apply_pooling`, run on token coordinates. Policies that prune
inside the tower are refused where tokens are resampled.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_onevision import modeling_llava_onevision
from vtprune.adapters.llava_next import LlavaNextAdapter, _coordinates, bilinear, row_end, token

from vtprune.crops import RESAMPLED, ROW_END, CropLayout, Group

SHARED = ("vision_feature_layer", "vision_feature_select_strategy")


class LlavaOnevisionAdapter(LlavaNextAdapter):
    model_types = ("llava_onevision",)
    modeling = modeling_llava_onevision
    modalities = {
        "image": ("pixel_values", "image_sizes", "batch_num_images", *SHARED),
        "video": ("pixel_values_videos", *SHARED),
    }

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.placeholders = {"image": model.config.image_token_id, "video": model.config.video_token_id}

    def _image_crops(self, vision_inputs: dict[str, Any]) -> tuple[int, ...]:
        crops = super()._image_crops(vision_inputs)
        counts = vision_inputs.get("batch_num_images")
        if counts is None:
            return crops
        alone = [int(count) == 1 for count in counts for _ in range(int(count))]  # get_image_features' rule
        return tuple(count if single else 1 for count, single in zip(crops, alone, strict=True))

    def _pack(self, coordinates: list[torch.Tensor], vision_inputs: dict[str, Any]) -> list[torch.Tensor]:
        # the ratio forward uses: get_image_features takes it from the config (forward passes none)
        packed, _ = self.model.model.pack_image_features(
            coordinates,
            vision_inputs["image_sizes"],
            image_newline=row_end(),
            vision_aspect_ratio=self.model.config.vision_aspect_ratio,
        )
        return list(packed)

    def crop_layout(
        self, vision_inputs: dict[str, Any], modality: str, temporal: str, input_ids: torch.Tensor | None = None
    ) -> CropLayout:
        if modality == "image":
            return super().crop_layout(vision_inputs, modality, temporal)
        return self._video_layout(vision_inputs, temporal)

    def _video_layout(self, vision_inputs: dict[str, Any], temporal: str) -> CropLayout:
        """Each frame a crop; its pooled tokens one group (or the video's, `joint`); the trailing newline kept."""
        tokens, grid = self._crop_shape(vision_inputs)
        side = self.side
        videos, frames = vision_inputs["pixel_values_videos"].shape[:2]
        pooled = self.model.model.apply_pooling(_coordinates(1, side, 1)[:, :, 1:])[0]  # [pooled tokens, 2]
        corners, weights = bilinear(pooled)
        units = len(pooled)
        rows = int(pooled[:, 0].unique().numel())
        sources, resampled = [], []
        for video in range(videos):
            first = video * frames
            frame_sources = [(first + frame) * tokens + token(corners, side) for frame in range(frames)]
            spans = [torch.arange(frame * units, (frame + 1) * units) for frame in range(frames)]
            if temporal == "joint" and frames > 1:
                groups = (Group(video, torch.cat(spans), torch.cat(frame_sources), weights.repeat(frames, 1), None),)
            else:
                groups = tuple(
                    Group(video, span, frame_source, weights, (rows, units // rows))
                    for span, frame_source in zip(spans, frame_sources, strict=True)
                )
            resampled.append(groups)
            sources.append(torch.cat([torch.full((frames * units,), RESAMPLED), torch.tensor([ROW_END])]))
        return CropLayout(
            crop_tokens=tokens,
            crop_grid=grid,
            crops=(frames,) * videos,
            sources=tuple(sources),
            grids=((rows, units // rows),) * videos,
            frames=(frames,) * videos,
            resampled=tuple(resampled),
        )

    def encode(self, vision_inputs: dict[str, Any], modality: str) -> list[torch.Tensor]:
        if modality == "image":
            return super().encode(vision_inputs, modality)
        out = self.model.model.get_video_features(**vision_inputs, return_dict=True)
        return list(out.pooler_output)

    def encoder_output(self, features: list[torch.Tensor], orders: list[torch.Tensor], modality: str) -> Any:
        if modality == "image":
            return super().encoder_output(features, orders, modality)
        # forward flattens `[videos, tokens, hidden]` features: one row holds them all, however many each keeps
        return BaseModelOutputWithPooling(pooler_output=torch.cat(features)[None])
