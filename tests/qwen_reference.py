"""Qwen-VL inputs built by hand: each row alone, holding only the kept image and video tokens."""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

GRIDS = {"image": "image_grid_thw", "video": "video_grid_thw"}


@torch.no_grad()
def rows_by_hand(model, inputs, kept: dict[str, list[torch.Tensor]]) -> list[dict]:
    """Per row alone: a prompt holding only the kept placeholders, the kept image and video features (and
    Qwen3-VL's deepstack features) picked here, and the kept tokens' M-RoPE positions `[3, 1, n]` from the
    model's own `get_rope_index` on the unpruned prompt. `kept[modality][i]`: item i's kept tokens."""
    encoders = {"image": model.model.get_image_features, "video": model.model.get_video_features}
    pixels = {"image": "pixel_values", "video": "pixel_values_videos"}
    encoded = {m: encoders[m](inputs[pixels[m]], inputs[GRIDS[m]]) for m in kept}
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        **{GRIDS[m]: inputs[GRIDS[m]] for m in kept},
        attention_mask=inputs["attention_mask"],
    )
    ids = {m: getattr(model.config, f"{m}_token_id") for m in kept}
    item, rows = dict.fromkeys(kept, 0), []
    for b, row in enumerate(inputs["input_ids"]):
        columns, picked, seen = [], {m: [] for m in kept}, dict.fromkeys(kept, 0)
        for column, token in enumerate(row.tolist()):
            if not inputs["attention_mask"][b, column]:
                continue
            modality = next((m for m, i in ids.items() if i == token), None)
            if modality is None:
                columns.append(column)
                continue
            index = item[modality]
            if seen[modality] in kept[modality][index].tolist():
                columns.append(column)
            seen[modality] += 1
            if seen[modality] == len(encoded[modality].pooler_output[index]):
                picked[modality].append(index)
                item[modality], seen[modality] = index + 1, 0
        rows.append(
            {
                "input_ids": row[columns][None],
                "attention_mask": torch.ones(1, len(columns), dtype=torch.long),
                "mm_token_type_ids": inputs["mm_token_type_ids"][b, columns][None],
                "position_ids": positions[:, b : b + 1, columns],
                "mm_encoder_outputs": {m: _kept_output(encoded[m], picked[m], kept[m]) for m in kept if picked[m]},
            }
        )
    return rows


def _kept_output(encoded, items: list[int], kept: list[torch.Tensor]):
    features = [encoded.pooler_output[i][kept[i]] for i in items]
    if getattr(encoded, "deepstack_features", None) is None:
        return BaseModelOutputWithPooling(pooler_output=features)
    levels = [[level[i][kept[i]] for i in items] for level in encoded.deepstack_features]
    return BaseModelOutputWithDeepstackFeatures(pooler_output=features, deepstack_features=levels)
