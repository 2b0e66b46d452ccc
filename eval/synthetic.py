"""Random-weight LLaVA, LLaVA-NeXT, LLaVA-OneVision and Qwen-VL models, tokenizers and image processors built in
code from real config classes.

Tests use the tiny defaults; benchmarks pass realistic sizes (e.g. a CLIP-L/14-336 tower). Nothing here
touches a model hub.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Glm4vConfig,
    Glm4vForConditionalGeneration,
    Glm4vMoeConfig,
    Glm4vMoeForConditionalGeneration,
    Glm4vProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLProcessor,
    SiglipVisionConfig,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

PINPOINT_TILES = {"llava_next": [(1, 2), (2, 1), (2, 2)]}
"""LLaVA-NeXT's tile layouts (rows, cols) in units of the tower's input size (OneVision's: every one to `tiles`)."""
TINY_ASPECT_RATIO = "anyres_max_4"
"""OneVision's mosaic limit for tiny models: mosaics over 4 crops' worth (3x3 tiles, mostly) are interpolated down,
as `anyres_max_9` interpolates the 6x6 tiles of the real model's large images."""
LLAVA_FAMILIES = {
    "llava": (LlavaConfig, LlavaForConditionalGeneration),
    "llava_next": (LlavaNextConfig, LlavaNextForConditionalGeneration),
    "llava_onevision": (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration),
}

CLIP_L_TOWER = {
    "image_size": 336,
    "patch_size": 14,
    "vision_layers": 24,
    "vision_hidden": 1024,
    "vision_heads": 16,
    "vision_intermediate": 4096,
}
"""`llava_config` sizes of LLaVA-1.5's CLIP ViT-L/14-336 tower."""

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
QWEN_SPECIAL = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
GLM_SPECIAL = [
    "<|image|>",
    "<|video|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
]
WORDS = """
user assistant : ? . , what is in the image shown here describe a an of and which colour color red green blue
yellow shape circle square triangle left right how many yes no there picture answer one two three four
""".split()


INTERNVL_SPECIAL = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
"""InternVL's image tokens, by the tokenizer attribute its processor reads them from."""


def tokenizer(extra: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over a small English vocabulary with LLaVA's `<image>`, Qwen-VL's and GLM-4.1V's
    placeholders, and `extra` special tokens after them (name -> token, each also a tokenizer attribute)."""
    extra = extra or {}
    words = [*SPECIAL, *WORDS, *QWEN_SPECIAL, *GLM_SPECIAL, *extra.values()]
    vocab = {token: index for index, token in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens([*SPECIAL, *QWEN_SPECIAL, *GLM_SPECIAL, *extra.values()])
    made = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
    )
    for name, token in extra.items():
        setattr(made, name, token)
        setattr(made, f"{name}_id", made.convert_tokens_to_ids(token))
    return made


def llava_config(
    text: str = "llama",
    *,
    image_size: int = 28,
    patch_size: int = 7,
    vision_layers: int = 4,
    vision_hidden: int = 32,
    vision_heads: int = 4,
    vision_intermediate: int = 64,
    text_layers: int = 2,
    text_hidden: int = 32,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    text_intermediate: int = 64,
    vision_feature_layer: int | None = None,
    vision: str = "clip",
    attn_implementation: str = "sdpa",
    family: str = "llava",
    vision_aspect_ratio: str = TINY_ASPECT_RATIO,
    tiles: int = 3,
):
    """A LLaVA config with a CLIP (CLS token, features without it) or SigLIP (no CLS, all features) tower
    and a Llama or Qwen2 text backbone, sized by the arguments. `family` "llava_next" also cuts the image into
    up to 2x2 tiles of the tower's size (LLaVA-NeXT's grid pinpoints, scaled); "llava_onevision" into up to
    `tiles` x `tiles` (6 on the real model), interpolated down past `vision_aspect_ratio`, and takes videos. The
    feature layer defaults to the
    penultimate (LLaVA, LLaVA-NeXT) or the last (OneVision)."""
    vocab = tokenizer()
    text_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[text]
    text_config = text_class(
        vocab_size=len(vocab),
        hidden_size=text_hidden,
        intermediate_size=text_intermediate,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_kv_heads,
        max_position_embeddings=4096,
        pad_token_id=vocab.pad_token_id,
        bos_token_id=vocab.bos_token_id,
        eos_token_id=vocab.eos_token_id,
    )
    vision_class, strategy = {"clip": (CLIPVisionConfig, "default"), "siglip": (SiglipVisionConfig, "full")}[vision]
    vision_config = vision_class(
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    extra = {}
    layouts = PINPOINT_TILES.get(family, [])
    if family == "llava_onevision":
        layouts = [(rows, cols) for rows in range(1, tiles + 1) for cols in range(1, tiles + 1)]
    if layouts:
        extra["image_grid_pinpoints"] = [[image_size * r, image_size * c] for r, c in layouts]
    if family == "llava_onevision":
        extra |= {
            "video_token_id": vocab.convert_tokens_to_ids("<|video_pad|>"),
            "vision_aspect_ratio": vision_aspect_ratio,
        }
    if vision_feature_layer is None:
        vision_feature_layer = -1 if family == "llava_onevision" else -2
    config = LLAVA_FAMILIES[family][0](
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=vocab.convert_tokens_to_ids("<image>"),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=strategy,
        pad_token_id=vocab.pad_token_id,
        **extra,
    )
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    return config


def llava_model(config, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Random weights for a `llava_config`, built directly in `dtype` (no fp32 peak for bf16 models)."""
    torch.manual_seed(seed)
    with default_dtype(dtype):
        model = LLAVA_FAMILIES[config.model_type][1](config)
    model.generation_config.pad_token_id = config.pad_token_id
    return model.eval()


CLIP_L_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
}
"""`clip_checkpoint` sizes of CLIP ViT-L/14-336's text tower and joint space."""
TINY_CLIP_TEXT = {
    "hidden_size": 24,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 16,
    "projection_dim": 12,
}


def clip_checkpoint(
    path, vision_config, tokenizer, text: dict = TINY_CLIP_TEXT, width: int | None = None, seed: int = 3
) -> CLIPModel:
    """A random CLIP model paired with a VLM's tower (`vision_config`; `width` overrides its width), saved with
    `tokenizer` at `path` as a checkpoint. Its own vision tower has one layer: vtprune reads only its final norm
    and projection, applied to the VLM's tower's features."""
    text = dict(text)
    projection = text.pop("projection_dim")
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **text,
        },
        vision_config={
            "hidden_size": width or vision_config.hidden_size,
            "intermediate_size": 48,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": vision_config.image_size,
            "patch_size": vision_config.patch_size,
        },
        projection_dim=projection,
    )
    torch.manual_seed(seed)
    clip = CLIPModel(config).eval()
    clip.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return clip


def llava_processor(config):
    """A processor matching `config`: CLIP-style resize and crop (and anyres tiles), and the WordLevel tokenizer."""
    size = config.vision_config.image_size
    if config.model_type == "llava_onevision":
        return onevision_processor(config)
    sizes = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
    if isinstance(config, LlavaNextConfig):
        images = LlavaNextImageProcessorPil(image_grid_pinpoints=config.image_grid_pinpoints, **sizes)
        family = LlavaNextProcessor
    else:
        images, family = CLIPImageProcessorPil(**sizes), LlavaProcessor
    return family(
        image_processor=images,
        tokenizer=tokenizer(),
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=int(config.vision_config.model_type == "clip_vision_model"),
    )


def onevision_processor(config: LlavaOnevisionConfig) -> LlavaOnevisionProcessor:
    """LLaVA-OneVision's processor for `config`: its own image processor (anyres tiles, resize to squares, no crop),
    the WordLevel tokenizer with `<|video_pad|>` as the video placeholder, and a `FrameLayout` for videos.

    Like Qwen-VL's, the processor cannot be built without torchvision (its video processor needs it), so
    this fills in what its `__call__` uses; the call is transformers' own.
    """
    size = config.vision_config.image_size
    vocab = tokenizer()
    processor = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
    processor.image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": size, "width": size}, image_grid_pinpoints=config.image_grid_pinpoints
    )
    processor.tokenizer, processor.chat_template = vocab, None
    processor.video_processor = FrameLayout(processor.image_processor)
    processor.image_token, processor.video_token = "<image>", "<|video_pad|>"
    processor.image_token_id = vocab.convert_tokens_to_ids(processor.image_token)
    processor.video_token_id = vocab.convert_tokens_to_ids(processor.video_token)
    processor.num_image_tokens = (size // config.vision_config.patch_size) ** 2
    processor.vision_feature_select_strategy = config.vision_feature_select_strategy
    processor.vision_aspect_ratio = config.vision_aspect_ratio
    return processor


class FrameLayout:
    """Stands in for OneVision's video processor, which needs torchvision: `pixel_values_videos` `[videos, frames, C,
    H, W]` of `[frames, H, W, 3]` uint8 videos with equal frame counts, each frame resized to the tower's square
    and normalised as the image processor does its base crop."""

    def __init__(self, images: LlavaOnevisionImageProcessorPil) -> None:
        self.images = images

    def __call__(self, videos, **_: object) -> dict[str, torch.Tensor]:
        videos = [videos] if isinstance(videos, np.ndarray) and videos.ndim == 4 else videos
        frames = [
            self.images([Image.fromarray(frame) for frame in video], return_tensors="pt")["pixel_values"][:, 0]
            for video in videos
        ]
        return {"pixel_values_videos": torch.stack(frames)}


QWEN_FAMILIES = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, 14),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, 14),
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, 16),
    "qwen3_vl_moe": (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration, Qwen3VLProcessor, 16),
    "glm4v": (Glm4vConfig, Glm4vForConditionalGeneration, Glm4vProcessor, 14),
    "glm4v_moe": (Glm4vMoeConfig, Glm4vMoeForConditionalGeneration, Glm4vProcessor, 14),
}
"""Per Qwen-VL-shaped family (a packed tower of 2x2 merge units, M-RoPE; GLM-4.1V's is one): config, model and
processor classes, and the vision patch size."""
QWEN_PLACEHOLDERS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
"""Qwen-VL's image and video placeholders and the tokens around each image or video."""


def qwen_vl_config(
    family: str = "qwen2_vl",
    *,
    vision_depth: int = 4,
    vision_width: int = 32,
    vision_heads: int = 4,
    text_layers: int = 2,
    text_hidden: int = 32,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    text_intermediate: int = 64,
    attn_implementation: str = "sdpa",
):
    """A Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE or GLM-4.1V config (2x2 merge units, M-RoPE) sized by the
    arguments. Qwen2.5-VL gets windows of 4x4 merge units with full attention in every other block from the
    second on; Qwen3-VL gets deepstack features from the first two blocks; Qwen3-VL-MoE is Qwen3-VL with 4 experts
    (2 per token, each half the MLP's width) in every decoder layer but the first; GLM-4.1V rotates half of each
    head's dimensions (heads under 16 dimensions are widened to 16, so each M-RoPE axis gets some); GLM-4.5V is GLM-4.1V
    with 4 routed experts and a shared one in every decoder layer but the first."""
    config_class, _, _, patch = QWEN_FAMILIES[family]
    vocab = tokenizer()
    if family.startswith("glm4v") and text_hidden // text_heads < 16:  # its head_dim is hidden // heads
        text_heads, text_kv_heads = max(1, text_hidden // 16), max(1, text_hidden // 32)
    head_dim = text_hidden // text_heads
    rotated = head_dim // 2 if family.startswith("glm4v") else head_dim
    section = [rotated // 2 - 2 * (rotated // 8), rotated // 8, rotated // 8]  # 16/24/24 of 64, scaled
    vision = {"depth": vision_depth, "num_heads": vision_heads, "patch_size": patch}
    if family == "qwen2_vl":
        vision |= {"embed_dim": vision_width, "hidden_size": text_hidden, "mlp_ratio": 2}
    else:
        vision |= {"hidden_size": vision_width, "intermediate_size": 2 * vision_width, "out_hidden_size": text_hidden}
    if family.startswith("glm4v"):
        vision |= {"image_size": 8 * patch, "spatial_merge_size": 2}
    if family == "qwen2_5_vl":
        vision |= {"window_size": 4 * 2 * patch, "fullatt_block_indexes": list(range(1, vision_depth, 2))}
    if family.startswith("qwen3_vl"):
        vision |= {"num_position_embeddings": 64, "deepstack_visual_indexes": [0, 1]}
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
    if family.startswith("qwen3_vl"):
        rope["mrope_interleaved"] = True
    if family.startswith("glm4v"):
        rope["partial_rotary_factor"] = 0.5
    experts = {}
    if family == "glm4v_moe":
        experts = {
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "moe_intermediate_size": text_intermediate // 2,
            "first_k_dense_replace": 1,
        }
    if family == "qwen3_vl_moe":
        experts = {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": text_intermediate // 2,
            "mlp_only_layers": [0],
        }
    config = config_class(
        vision_config=vision,
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": text_hidden,
            "intermediate_size": text_intermediate,
            "num_hidden_layers": text_layers,
            "num_attention_heads": text_heads,
            "num_key_value_heads": text_kv_heads,
            "head_dim": head_dim,
            "max_position_embeddings": 4096,
            "rope_parameters": rope,
            "pad_token_id": vocab.pad_token_id,
            "bos_token_id": vocab.bos_token_id,
            "eos_token_id": vocab.eos_token_id,
            **experts,
        },
        **{name: vocab.convert_tokens_to_ids(token) for name, token in _special_ids(family).items()},
    )
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    return config


def placeholder(family: str, modality: str = "image") -> str:
    """What a prompt of a Qwen-VL-shaped family writes for one image or video before its processor expands it."""
    if family.startswith("glm4v"):
        return "<|begin_of_image|><|image|><|end_of_image|>" if modality == "image" else "<|video|>"
    return f"<|vision_start|><|{modality}_pad|><|vision_end|>"


def _special_ids(family: str) -> dict[str, str]:
    """The config's special token ids (keyword -> token) of a Qwen-VL-shaped family."""
    if family.startswith("glm4v"):
        ends = {
            f"{kind}_{end}_token_id": f"<|{end}_of_{kind}|>" for kind in ("image", "video") for end in ("start", "end")
        }
        return {"image_token_id": "<|image|>", "video_token_id": "<|video|>"} | {
            name: token.replace("start", "begin") for name, token in ends.items()
        }
    image, video, start, end = QWEN_PLACEHOLDERS
    return {
        "image_token_id": image,
        "video_token_id": video,
        "vision_start_token_id": start,
        "vision_end_token_id": end,
    }


def qwen_vl_model(config, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Random weights for a `qwen_vl_config`, built directly in `dtype`."""
    torch.manual_seed(seed)
    with default_dtype(dtype):
        model = QWEN_FAMILIES[config.model_type][1](config)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return model.eval()


def qwen_vl_processor(family: str = "qwen2_vl", min_tokens: int = 4, max_tokens: int = 64):
    """The family's processor for images, with the WordLevel tokenizer; images resize to min..max LLM tokens.

    The Qwen-VL processors cannot be built without torchvision (they insist on a video processor, which
    needs it), so this fills in what their `__call__` uses for images and text, and a `VideoLayout` for the
    video processor; the call is transformers' own (for Qwen2-VL's videos too: its processor needs no more).
    """
    _, _, processor_class, patch = QWEN_FAMILIES[family]
    vocab = tokenizer()
    unit = (2 * patch) ** 2  # pixels of one 2x2 merge unit
    image_class, frames = (Glm4vImageProcessorPil, 2) if family.startswith("glm4v") else (Qwen2VLImageProcessorPil, 1)
    size = {"shortest_edge": unit * min_tokens * frames, "longest_edge": unit * max_tokens * frames}
    images = image_class(size=size, patch_size=patch)  # GLM-4.1V's bounds count an image as its 2 temporal frames
    processor = processor_class.__new__(processor_class)
    processor.image_processor, processor.tokenizer, processor.video_processor = images, vocab, VideoLayout(images)
    processor.chat_template = None
    tokens = _special_ids(family)
    for name in ("image", "video", "vision_start", "vision_end"):
        if f"{name}_token_id" in tokens:
            setattr(processor, f"{name}_token", tokens[f"{name}_token_id"])
            setattr(processor, f"{name}_token_id", vocab.convert_tokens_to_ids(tokens[f"{name}_token_id"]))
    if family.startswith("glm4v"):
        processor.video_start_id = vocab.convert_tokens_to_ids(tokens["video_start_token_id"])
        processor.video_end_id = vocab.convert_tokens_to_ids(tokens["video_end_token_id"])
    return processor


def qwen_vl_inputs(processor, prompts: list[str], images=(), videos=()) -> dict[str, torch.Tensor]:
    """A Qwen-VL-shaped processor's output for prompts holding its image and video placeholders (Qwen's
    `<|image_pad|>` and `<|video_pad|>`, GLM-4.1V's `<|image|>` and `<|video|>`), one per image / video
    (`[frames, H, W, 3]` uint8 arrays) in order. Images go through the processor's image processor; videos are
    laid out as Qwen's video processor lays them (pairs of frames form temporal patches of merge-unit-ordered
    patches), which is re-done here because that processor needs torchvision."""
    pixels, out = processor.image_processor, {}
    sizes = {"image": []}
    if images:
        out |= {k: torch.as_tensor(v) for k, v in pixels(list(images), return_tensors="np").items()}
        sizes["image"] = (out["image_grid_thw"].prod(-1) // 4).tolist()
    if videos:
        out |= processor.video_processor(list(videos))
    grids = [tuple(grid) for grid in out.get("video_grid_thw", torch.zeros(0, 3)).tolist()]
    image_token, video_token = processor.image_token, processor.video_token
    texts = []
    for prompt in prompts:  # images first: GLM-4.1V's video frames are image placeholders
        pieces = prompt.split(image_token)
        prompt = pieces[0] + "".join(image_token * sizes["image"].pop(0) + piece for piece in pieces[1:])
        pieces = prompt.split(video_token)
        prompt = pieces[0] + "".join(_video_placeholder(processor, grids.pop(0)) + piece for piece in pieces[1:])
        texts.append(prompt)
    tokens = processor.tokenizer(texts, return_tensors="pt", padding=True)
    return {**tokens, "mm_token_type_ids": _token_types(processor, tokens["input_ids"]), **out}


def _token_types(processor, input_ids: torch.Tensor) -> torch.Tensor:
    """`mm_token_type_ids`: 1 on image placeholders, 2 on video ones (GLM-4.1V's are image placeholders between its
    begin and end of video tokens)."""
    kinds = torch.zeros_like(input_ids)
    kinds[input_ids == processor.image_token_id] = 1
    kinds[input_ids == processor.video_token_id] = 2
    if isinstance(processor, Glm4vProcessor):
        inside = (input_ids == processor.video_start_id).long().cumsum(1) > (
            input_ids == processor.video_end_id
        ).long().cumsum(1)
        kinds[(input_ids == processor.image_token_id) & inside] = 2
    return kinds


class VideoLayout:
    """Stands in for Qwen's video processor, which needs torchvision: `pixel_values_videos` and `video_grid_thw`
    of `[frames, H, W, 3]` uint8 videos as that processor lays them out, each frame resized by `images`."""

    def __init__(self, images: Qwen2VLImageProcessorPil) -> None:
        self.images = images
        self.merge_size, self.temporal_patch_size = images.merge_size, images.temporal_patch_size

    def __call__(self, videos: list[np.ndarray], **_: object) -> dict[str, torch.Tensor]:
        patches, grids = zip(*(_video_patches(self.images, frames) for frames in videos), strict=True)
        return {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.stack(grids)}


def _video_placeholder(processor, grid: tuple[int, int, int]) -> str:
    """A video's placeholder tokens: Qwen3-VL's processor splits them per frame group, each after its timestamp
    (here one frame group per second) and between its own vision start and end tokens; GLM-4.1V's makes each
    frame group an image followed by its second, all between begin and end of video."""
    groups, rows, cols = grid
    if isinstance(processor, Glm4vProcessor):
        group = "<|begin_of_image|>" + processor.image_token * (rows * cols // 4) + "<|end_of_image|>"
        return "<|begin_of_video|>" + "".join(f"{group}{second}" for second in range(groups)) + "<|end_of_video|>"
    if not isinstance(processor, Qwen3VLProcessor):
        return "<|video_pad|>" * (groups * rows * cols // 4)
    group = "<|video_pad|>" * (rows * cols // 4)
    return "".join(f"<{second:.1f} seconds><|vision_start|>{group}<|vision_end|>" for second in range(groups))


def _video_patches(pixels, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """`[groups * rows * cols, C * T * p * p]` patches and the `(groups, rows, cols)` grid of one video."""
    temporal, patch = pixels.temporal_patch_size, pixels.patch_size
    if len(frames) % temporal:
        frames = np.concatenate([frames, np.repeat(frames[-1:], temporal - len(frames) % temporal, axis=0)])
    each = pixels([Image.fromarray(frame) for frame in frames], return_tensors="pt")
    grid = each["image_grid_thw"][0]
    per_frame = each["pixel_values"].view(len(frames), int(grid[1] * grid[2]), -1, temporal, patch, patch)[:, :, :, 0]
    groups = per_frame.view(len(frames) // temporal, temporal, *per_frame.shape[1:]).permute(0, 2, 3, 1, 4, 5)
    return groups.reshape(-1, groups.shape[2] * temporal * patch * patch), torch.tensor(
        [len(frames) // temporal, int(grid[1]), int(grid[2])]
    )


def internvl_config(
    *,
    image_size: int = 56,
    vision_layers: int = 3,
    vision_hidden: int = 32,
    vision_heads: int = 4,
    text_layers: int = 2,
    text_hidden: int = 32,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    attn_implementation: str = "sdpa",
) -> InternVLConfig:
    """An InternVL 3 config: InternViT with its CLS token and 14-pixel patches, pixel shuffle 0.5 (each LLM token a
    2x2 block of patches: 4 per 56-pixel tile), MLP projector, Qwen2 LLM."""
    vocab = tokenizer(INTERNVL_SPECIAL)
    config = InternVLConfig(
        vision_config={
            "hidden_size": vision_hidden,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": vision_heads,
            "intermediate_size": 2 * vision_hidden,
            "image_size": [image_size, image_size],
            "patch_size": [14, 14],
        },
        text_config={
            "model_type": "qwen2",
            **_text_sizes(vocab, text_hidden, text_layers, text_heads, text_kv_heads),
        },
        image_token_id=vocab.context_image_token_id,
        image_seq_length=(image_size // 28) ** 2,
    )
    for part in (config, config.text_config, config.vision_config):
        part._attn_implementation = attn_implementation
    return config


def _text_sizes(vocab, hidden: int, layers: int, heads: int, kv_heads: int) -> dict:
    """A text config's sizes and special tokens, over `vocab`, with an MLP twice as wide as the model."""
    return {
        "vocab_size": len(vocab),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 4096,
        "pad_token_id": vocab.pad_token_id,
        "bos_token_id": vocab.bos_token_id,
        "eos_token_id": vocab.eos_token_id,
    }


def internvl_model(config: InternVLConfig, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Random weights for an `internvl_config`, built directly in `dtype`."""
    torch.manual_seed(seed)
    with default_dtype(dtype):
        model = InternVLForConditionalGeneration(config)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return model.eval()


def internvl_processor(config: InternVLConfig, max_tiles: int = 4) -> InternVLProcessor:
    """InternVL's processor for images (up to `max_tiles` tiles and a thumbnail each), with the WordLevel tokenizer.
    Its video processor needs torchvision, so the processor is filled in by hand, as its `__init__` would for
    images, and called as it is."""
    side = config.vision_config.image_size[0]
    images = GotOcr2ImageProcessorPil(
        size={"height": side, "width": side}, crop_to_patches=True, min_patches=1, max_patches=max_tiles
    )
    vocab = tokenizer(INTERNVL_SPECIAL)
    processor = InternVLProcessor.__new__(InternVLProcessor)
    processor.image_processor, processor.tokenizer, processor.video_processor = images, vocab, None
    processor.chat_template = None
    processor.image_seq_length = config.image_seq_length
    processor.start_image_token, processor.end_image_token = vocab.start_image_token, vocab.end_image_token
    processor.start_image_token_id, processor.end_image_token_id = vocab.start_image_token_id, vocab.end_image_token_id
    processor.image_token, processor.image_token_id = vocab.context_image_token, vocab.context_image_token_id
    processor.video_token = vocab.video_token
    processor.multimodal_pattern = re.compile(
        f"(?P<image>{re.escape(processor.image_token)})|(?P<video>{re.escape(processor.video_token)})"
    )
    return processor


GEMMA_SPECIAL = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
"""Gemma 3's image tokens, by the tokenizer attribute its processor reads them from."""


def gemma3_config(
    *,
    image_size: int = 64,
    patch_size: int = 4,
    tokens_per_image: int = 16,
    vision_layers: int = 3,
    vision_hidden: int = 32,
    vision_heads: int = 4,
    text_layers: int = 3,
    text_hidden: int = 32,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    head_dim: int = 8,
    layer_types: tuple[str, ...] | None = None,
    sliding_window: int = 20,
    attn_implementation: str = "sdpa",
) -> Gemma3Config:
    """A Gemma 3 config: SigLIP tower, projector average-pooling windows of patches (`image_size / patch_size`
    patches a side pooled to `sqrt(tokens_per_image)`: 16x16 patches to 4x4 tokens by default, 4x4 patches each,
    as the real 64x64 to 16x16), Gemma 3 LLM whose layers alternate a short sliding window (default: sliding,
    global, sliding) with their own RoPE."""
    vocab = tokenizer(GEMMA_SPECIAL)
    types = layer_types or tuple("full_attention" if i % 2 else "sliding_attention" for i in range(text_layers))
    config = Gemma3Config(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": vision_hidden,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": vision_heads,
            "intermediate_size": 2 * vision_hidden,
            "image_size": image_size,
            "patch_size": patch_size,
            "vision_use_head": False,
        },
        text_config={
            **_text_sizes(vocab, text_hidden, text_layers, text_heads, text_kv_heads),
            "head_dim": head_dim,
            "query_pre_attn_scalar": head_dim,
            "layer_types": list(types),
            "sliding_window": sliding_window,
        },
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=vocab.boi_token_id,
        eoi_token_index=vocab.eoi_token_id,
        image_token_index=vocab.image_token_id,
    )
    for part in (config, config.text_config, config.vision_config):
        part._attn_implementation = attn_implementation
    return config


def gemma3_model(config: Gemma3Config, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Random weights for a `gemma3_config`, built directly in `dtype`."""
    torch.manual_seed(seed)
    with default_dtype(dtype):
        model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # initialised to zeros, which would give every image token one feature
        projection = model.model.multi_modal_projector.mm_input_projection_weight
        projection.normal_(0.0, projection.shape[0] ** -0.5)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return model.eval()


def gemma3_processor(config: Gemma3Config) -> Gemma3Processor:
    """Gemma 3's processor (its PIL image processor at the tower's size) with the WordLevel tokenizer; prompts
    hold one `<start_of_image>` per image, which it expands to the image's tokens and marks in `token_type_ids`."""
    side = config.vision_config.image_size
    images = Gemma3ImageProcessorPil(size={"height": side, "width": side})
    return Gemma3Processor(images, tokenizer(GEMMA_SPECIAL), image_seq_length=config.mm_tokens_per_image)


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """An RGB image of uniform random pixels."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
