"""The Hugging Face model families siftlens runs, and where each keeps its parts.

One :class:`Family` per architecture says what differs: how many prefix tokens come before the patches,
whether token 0 is a CLS token, the name of each encoder layer's attention module, the vision-tower class
to load from a multimodal checkpoint, and whether the position embeddings adapt to the input size.

Families:

- ViT, DeiT (CLS + distillation), DINOv2 (+ registers), the ViT-MAE encoder: as before.
- CLIP: the vision tower (``CLIPVisionModel``; a ``CLIPModel`` checkpoint or object is used through its
  ``vision_model``), ``[CLS, patches]``; ``CLIPForImageClassification`` keeps its head.
- SigLIP and SigLIP2: the vision tower; no CLS token (``T = 0``): the pooled embedding comes from an
  attention-pooling head outside the encoder, so siftlens's "CLS row" metrics use the mean attention over
  patch queries instead (``has_cls = False``, the same rule as for the project's mean-pooled ViTs).
  SigLIP2 is NaFlex: patchified input with ``spatial_shapes``; siftlens feeds one fixed square grid.
- BEiT and Data2Vec-vision: ``[CLS, patches]`` with a relative position bias added to the attention
  logits in every layer (as the attention mask); token drop gathers that bias with the tokens, so every
  kept token keeps its relative positions. Data2Vec-vision still has transformers' older layout (weights only
  with ``output_attentions=True``, the bias as ``relative_position_bias``): its backend asks for the weights
  during a capture and swaps an SDPA attention class for its eager parent for that time.

Window-attention models (Swin and its relatives) are refused: a token attends only inside its window, so
there is no global token-to-token map to measure.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelLoadError


@dataclass(frozen=True)
class Family:
    name: str
    attention_attr: str = "attention"  # attribute of an encoder layer holding its attention module
    has_cls: bool = True
    vision_class: str | None = None  # class loaded for a checkpoint that is no classifier (the vision tower)
    interpolates: bool = False  # position embeddings resampled to any input size on every forward
    relative_bias: bool = False  # the attention mask carries a per-layer relative position bias
    naflex: bool = False  # SigLIP2: patchified pixels, spatial_shapes, position embeddings resized per grid
    multimodal_config: bool = False  # the checkpoint config holds the vision settings in .vision_config
    # transformers' older layout (Data2Vec-vision): attention weights only with output_attentions=True, the
    # eager or SDPA class fixed at construction, the relative position bias passed as relative_position_bias
    legacy: bool = False


FAMILIES: dict[str, Family] = {
    "vit": Family("ViT"),
    "deit": Family("DeiT"),
    "dinov2": Family("DINOv2", interpolates=True),
    "dinov2_with_registers": Family("DINOv2 with registers", interpolates=True),
    "vit_mae": Family("ViT-MAE encoder"),
    "clip": Family("CLIP vision", "self_attn", vision_class="CLIPVisionModel", multimodal_config=True),
    "clip_vision_model": Family("CLIP vision", "self_attn", vision_class="CLIPVisionModel"),
    "siglip": Family("SigLIP vision", "self_attn", has_cls=False, vision_class="SiglipVisionModel",
                     multimodal_config=True),
    "siglip_vision_model": Family("SigLIP vision", "self_attn", has_cls=False, vision_class="SiglipVisionModel"),
    "siglip2": Family("SigLIP2 vision", "self_attn", has_cls=False, vision_class="Siglip2VisionModel",
                      naflex=True, multimodal_config=True),
    "siglip2_vision_model": Family("SigLIP2 vision", "self_attn", has_cls=False,
                                   vision_class="Siglip2VisionModel", naflex=True),
    "beit": Family("BEiT", relative_bias=True),
    "data2vec-vision": Family("Data2Vec-vision", relative_bias=True, legacy=True),
}
SUPPORTED_TYPES = tuple(FAMILIES)

# pure window attention: no token attends to every other token in any layer
WINDOW_ATTENTION = ("swin", "swinv2", "donut-swin", "maskformer-swin", "swin2sr")


def family(model_type: str) -> Family:
    """The family of an HF ``model_type``; a one-line ModelLoadError for any other."""
    fam = FAMILIES.get(model_type)
    if fam is not None:
        return fam
    if model_type in WINDOW_ATTENTION:
        raise ModelLoadError(
            f"Hugging Face model_type '{model_type}' is not supported: window attention has no global "
            "token-to-token map"
        )
    raise ModelLoadError(
        f"Hugging Face model_type '{model_type}' is not supported; siftlens supports: " + ", ".join(SUPPORTED_TYPES)
    )


def vision_config(config, fam: Family):
    """The config holding the vision tower's settings (CLIP and SigLIP checkpoints nest it)."""
    return config.vision_config if fam.multimodal_config else config


def prefix_tokens(config) -> int:
    """Tokens before the patches: CLS, plus DeiT's distillation token or DINOv2's registers; none for SigLIP."""
    fam = family(config.model_type)
    if not fam.has_cls:
        return 0
    if config.model_type == "deit":
        return 2
    if config.model_type == "dinov2_with_registers":
        return 1 + int(config.num_register_tokens)
    return 1
