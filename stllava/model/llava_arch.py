"""Image splicing: the multimodal half of the LLaVA model (docs/Method.md#splice).

``prepare_inputs_labels_for_multimodal`` replaces every ``IMAGE_TOKEN_INDEX`` in ``input_ids`` with
the projected features of one image, in a single vectorised scatter (no per-sample Python loop over
tokens), at the positions :func:`stllava.splice.splice_layout` gives, and returns embeddings, labels
(laid out like the embeddings: what DPO sums its log-probs over), attention mask and position ids
for the language model.
The vision tower runs once per forward, on all images of the batch together.
"""
from __future__ import annotations

import torch

from stllava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from stllava.model.projector import build_vision_projector
from stllava.model.vision_tower import CLIPVisionTower, build_vision_tower
from stllava.splice import splice_layout


class LlavaMetaModel:
    """Mixin for the base model: owns ``vision_tower`` and ``mm_projector``."""

    def _init_multimodal(self, config) -> None:
        if getattr(config, "mm_vision_tower", None):
            self.vision_tower = build_vision_tower(config)
            self.mm_projector = build_vision_projector(config)

    def get_vision_tower(self) -> CLIPVisionTower | None:
        return getattr(self, "vision_tower", None)

    def initialize_vision_modules(self, vision_tower: str, *, select_layer: int = -2,
                                  select_feature: str = "patch", projector_type: str = "cluster",
                                  pretrain_mm_mlp_adapter: str | None = None,
                                  load_tower_weights: bool = True) -> None:
        """Attach a CLIP tower (loaded from ``vision_tower``) and a fresh projector to a model
        that has none yet (e.g. starting from a plain LLaMA/Vicuna checkpoint)."""
        cfg = self.config
        cfg.mm_vision_tower = vision_tower
        cfg.mm_vision_select_layer = select_layer
        cfg.mm_vision_select_feature = select_feature
        tower = CLIPVisionTower(vision_tower, select_layer, select_feature)
        if load_tower_weights:
            tower.load_model()
        cfg.mm_vision_config = tower.config.to_dict()
        cfg.mm_hidden_size = tower.hidden_size
        cfg.mm_projector_type = projector_type
        cfg.use_mm_proj = True
        self.vision_tower = tower
        self.mm_projector = build_vision_projector(cfg).to(dtype=self.embed_tokens.weight.dtype)
        if pretrain_mm_mlp_adapter:
            from stllava.model.weights import load_projector_weights

            self.mm_projector.load_state_dict(load_projector_weights(pretrain_mm_mlp_adapter))


class LlavaMetaForCausalLM:
    """Mixin for the CausalLM: encodes images and splices them into the text embeddings."""

    def get_vision_tower(self) -> CLIPVisionTower | None:
        return self.get_model().get_vision_tower()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, 3, H, W] → projected features [N, P, hidden]."""
        feats = self.get_model().vision_tower(images)
        proj = self.get_model().mm_projector
        dtype = next((p.dtype for p in proj.parameters()), feats.dtype)
        return proj(feats.to(dtype))

    def prepare_inputs_labels_for_multimodal(self, input_ids, attention_mask, labels, images,
                                             align: str = "left"):
        """Return ``(inputs_embeds, attention_mask, position_ids, labels)``.

        ``images`` is either one image per ``IMAGE_TOKEN_INDEX`` in the batch (row-major order),
        or one image per sample (LLaVA's training convention), in which case samples without an
        image token leave theirs unused. Padding of the expanded batch goes on the right
        (``align="left"``, training) or on the left (``align="right"``, generation).
        Raises ValueError when image tokens and images disagree.
        """
        embed = self.get_model().embed_tokens
        is_img = input_ids == IMAGE_TOKEN_INDEX
        if images is None:
            if is_img.any():
                raise ValueError(f"the batch holds {int(is_img.sum())} <image> tokens but no images were given")
            return embed(input_ids), attention_mask, None, labels

        B, T = input_ids.shape
        per_sample = is_img.sum(1)
        n_tokens = int(per_sample.sum())
        if isinstance(images, (list, tuple)):
            images = torch.stack(list(images))
        n_images = images.shape[0]
        if n_tokens == n_images:
            use = torch.ones(n_images, dtype=torch.bool, device=images.device)
        elif n_images == B and bool((per_sample <= 1).all()):
            use = (per_sample == 1).to(images.device)
        else:
            raise ValueError(
                f"the batch holds {n_tokens} <image> tokens (per sample: {per_sample.tolist()}) but "
                f"{n_images} images were given; give one image per <image> token, or one per sample "
                f"with at most one <image> each"
            )

        feats = self.encode_images(images)  # the tower runs once, on every image of the batch
        text = embed(input_ids.masked_fill(is_img, 0))
        feats = feats.to(text.dtype)
        P, H = feats.shape[1], feats.shape[2]
        used = feats[use]
        # Unused images (text-only samples) stay in the graph with weight 0 so every rank runs
        # the same parameters (ZeRO-3 / DDP would otherwise hang or complain).
        dummy = feats[~use].sum() * 0.0 if (~use).any() else None

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        _, _, start, lengths = splice_layout(input_ids, P)  # first output slot of each input token
        L = int(lengths.max())
        offset = (L - lengths) if align == "right" else torch.zeros_like(lengths)
        start = start + offset[:, None]

        rows = torch.arange(B, device=input_ids.device)[:, None].expand(B, T)
        out = text.new_zeros(B, L, H)
        new_mask = torch.zeros(B, L, dtype=torch.bool, device=input_ids.device)
        new_labels = None
        tmask = ~is_img
        out[rows[tmask], start[tmask]] = text[tmask]
        new_mask[rows[tmask], start[tmask]] = attention_mask[tmask]
        if labels is not None:
            new_labels = torch.full((B, L), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
            new_labels[rows[tmask], start[tmask]] = labels[tmask]
        if n_tokens:
            img_rows = rows[is_img][:, None].expand(-1, P)
            img_cols = start[is_img][:, None] + torch.arange(P, device=input_ids.device)
            out[img_rows, img_cols] = used.reshape(-1, P, H)
            new_mask[img_rows, img_cols] = True
        if dummy is not None:
            out = out + dummy
        position_ids = (new_mask.long().cumsum(1) - 1).clamp(min=0)
        return out, new_mask.to(attention_mask.dtype).long(), position_ids, new_labels
