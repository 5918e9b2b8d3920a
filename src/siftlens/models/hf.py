"""Hugging Face Vision Transformers (ViT, DeiT, DINOv2 with or without registers, ViT-MAE encoder).

Models load from a local folder written by ``save_pretrained`` and never from a hub. Geometry comes from the
model's config; preprocessing from the folder's ``preprocessor_config.json`` (HF's PIL pipeline: resize,
centre crop with a floor offset, rescale, normalise), or a plain resize + centre crop with ImageNet
statistics when the folder has none.

Attention is observed on each encoder layer's attention module, whose forward returns
``(attn_output, attn_weights)`` with ``attn_weights: (B, h, S, S)`` in the eager implementation only
(SDPA and flash attention return ``None`` there); :meth:`HFBackend.eager` switches the model to eager for
the duration of a capture.

Token order is ``[CLS, (distillation | registers), patches in row-major order]``: ``S = T + g_h * g_w``.

Interventions (:meth:`~siftlens.models.backend.Backend.forward_intervened`): tokens are dropped from the
output of the embeddings module (position embeddings already added); the bias is added to each chosen
attention module's ``attention_mask``, which the eager and SDPA attention functions add to the logits.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import GeometryError, ModelLoadError
from ..io import read_json
from .backend import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backend,
    check_not_hub_name,
    first_line,
    pair,
    resize_center_crop,
    shortest_edge_size,
)

SUPPORTED_TYPES = ("vit", "deit", "dinov2", "dinov2_with_registers", "vit_mae")
# model types that resample their position embeddings to any input size on every forward
_INTERPOLATES_POSITIONS = ("dinov2", "dinov2_with_registers")
# processors whose integer ``size`` means "shortest edge" rather than a square
_SHORTEST_EDGE_PROCESSORS = ("BitImageProcessor", "CLIPImageProcessor", "ConvNextImageProcessor")
_PIL_BILINEAR = 2


@dataclass
class HFPreprocessing:
    """What an HF image processor does to a PIL image, in the order it does it.

    ``resize``: ("exact", (H, W)), ("shortest_edge", s) or None; ``crop``: (H, W) or None;
    ``resample``: a PIL filter number; ``scale``: rescale factor (1.0 when rescaling is off);
    ``mean``/``std``: per-channel statistics applied after rescaling (0 / 1 when normalisation is off).
    """

    resize: tuple[str, object] | None
    crop: tuple[int, int] | None
    resample: int
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str  # "preprocessor_config.json" or "defaulted"

    def output_size(self) -> tuple[int, int] | None:
        """(H, W) of every preprocessed image, or None when it depends on the image."""
        if self.crop is not None:
            return self.crop
        if self.resize is not None and self.resize[0] == "exact":
            return self.resize[1]  # type: ignore[return-value]
        return None

    @classmethod
    def read(cls, folder: Path) -> HFPreprocessing | None:
        f = folder / "preprocessor_config.json"
        if not f.is_file():
            return None
        raw = read_json(f, "preprocessor config", error=ModelLoadError)
        ptype = str(raw.get("image_processor_type") or raw.get("feature_extractor_type") or "")
        resize = None
        if raw.get("do_resize", True):
            size = raw.get("size")
            if isinstance(size, int):
                square = not any(ptype.startswith(p) for p in _SHORTEST_EDGE_PROCESSORS)
                resize = ("exact", (size, size)) if square else ("shortest_edge", size)
            elif isinstance(size, dict) and "height" in size and "width" in size:
                resize = ("exact", (int(size["height"]), int(size["width"])))
            elif isinstance(size, dict) and set(size) == {"shortest_edge"}:
                resize = ("shortest_edge", int(size["shortest_edge"]))
            elif isinstance(size, (list, tuple)) and len(size) == 2:
                resize = ("exact", (int(size[0]), int(size[1])))
            else:
                raise ModelLoadError(
                    f"{f}: size={size!r} is not supported; use {{height, width}} or {{shortest_edge}}"
                )
        crop = pair(raw.get("crop_size"), "crop_size") if raw.get("do_center_crop", False) else None
        resample = raw.get("resample", _PIL_BILINEAR)
        if not isinstance(resample, int):
            raise ModelLoadError(f"{f}: resample={resample!r} is not a PIL filter number")
        scale = float(raw.get("rescale_factor", 1 / 255)) if raw.get("do_rescale", True) else 1.0
        if raw.get("do_normalize", True):
            mean = tuple(float(m) for m in _per_channel(raw.get("image_mean", IMAGENET_MEAN)))
            std = tuple(float(s) for s in _per_channel(raw.get("image_std", IMAGENET_STD)))
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return cls(resize, crop, resample, scale, mean, std, source=f.name)


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


def _per_channel(v) -> list[float]:
    return [v] * 3 if isinstance(v, (int, float)) else list(v)


def _center_crop_floor(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HF's centre crop of (h, w, 3) to ``size`` = (H, W): floor offsets, zero padding when too small."""
    H, W = size
    h, w = arr.shape[:2]
    if h < H or w < W:
        ph, pw = max(H, h), max(W, w)
        canvas = np.zeros((ph, pw, arr.shape[2]), dtype=arr.dtype)
        top, left = math.ceil((ph - h) / 2), math.ceil((pw - w) / 2)
        canvas[top : top + h, left : left + w] = arr
        arr, h, w = canvas, ph, pw
    top, left = (h - H) // 2, (w - W) // 2
    return np.ascontiguousarray(arr[top : top + H, left : left + W])


def _attention_output(module, args, kwargs, output) -> torch.Tensor | None:
    """HF attention modules return (attn_output, attn_weights); weights are None outside eager."""
    if isinstance(output, tuple) and len(output) > 1:
        return output[1]
    return None


class HFBackend(Backend):
    """A Hugging Face ViT-family model loaded from a local ``save_pretrained`` folder."""

    kind = "hf"
    bias_arg = "attention_mask"  # the eager and SDPA attention functions add it to the logits
    bias_arg_needs = "transformers >= 5 (pip install -U transformers)"

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device = "cpu",
        source: str = "",
        preprocessing: HFPreprocessing | None = None,
    ):
        super().__init__(model, device)
        cfg = model.config
        self.source = source
        self.model_type: str = cfg.model_type
        if self.model_type not in SUPPORTED_TYPES:
            raise ModelLoadError(_unsupported(self.model_type))
        P, config_hw = _config_geometry(cfg)
        self.patch_size = P
        self.input_size = _input_size(self.model_type, P, config_hw, preprocessing)
        self.grid_size = (self.input_size[0] // P, self.input_size[1] // P)
        self.num_prefix_tokens = _prefix_tokens(cfg)
        self.num_layers = int(cfg.num_hidden_layers)
        self.num_heads = int(cfg.num_attention_heads)
        self.is_classifier = "ForImageClassification" in type(model).__name__
        if self.is_classifier:
            id2label = {int(k): str(v) for k, v in (cfg.id2label or {}).items()}
            self.class_names = [id2label.get(i, str(i)) for i in range(int(cfg.num_labels))]
        self.preprocessing = preprocessing
        if preprocessing is None:
            self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        else:
            # fold HF's ``(x * scale - mean) / std`` into the base class's ``(x / 255 - mean') / std'``
            k = 255.0 * preprocessing.scale
            self.mean = tuple(m / k for m in preprocessing.mean)
            self.std = tuple(s / k for s in preprocessing.std)
        if self.model_type == "vit_mae":
            # keep every patch; forward() also passes noise whose argsort is the identity (no shuffle)
            cfg.mask_ratio = 0.0
        self._attention = self._attention_modules()
        self.check_geometry()

    # loading -------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu") -> HFBackend:
        """Load a model from a local folder holding ``config.json`` and weights; never downloads."""
        p = Path(path).expanduser()
        if not p.is_dir():
            if not p.exists():
                check_not_hub_name(path)
            raise ModelLoadError(
                f"model folder {path} does not exist; pass a folder written by save_pretrained()"
            )
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json; pass a folder written by save_pretrained()")
        try:
            import transformers
        except ImportError as e:
            raise ModelLoadError(
                "Hugging Face models need `pip install transformers` (or `pip install siftlens[hf]`)"
            ) from e
        try:
            config = transformers.AutoConfig.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"{p / 'config.json'} could not be read: {first_line(e)}") from e
        if config.model_type not in SUPPORTED_TYPES:
            raise ModelLoadError(_unsupported(config.model_type))
        preprocessing = HFPreprocessing.read(p)
        # geometry is checked before the (possibly large) weights are read
        P, config_hw = _config_geometry(config)
        _input_size(config.model_type, P, config_hw, preprocessing)
        model_cls = _model_class(transformers, config)
        if config.model_type == "vit_mae":
            config.mask_ratio = 0.0
        try:
            model, info = model_cls.from_pretrained(
                str(p), config=config, local_files_only=True, attn_implementation="eager",
                output_loading_info=True,
            )
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise ModelLoadError(f"could not load the model in {p}: {first_line(e)}") from e
        missing = sorted(k for k in info.get("missing_keys", []) if "pooler." not in k)
        mismatched = list(info.get("mismatched_keys", []))
        if missing or mismatched:
            bad = missing or [str(m[0]) if isinstance(m, tuple) else str(m) for m in mismatched]
            raise ModelLoadError(
                f"{p} does not hold a complete {type(model).__name__}: {len(bad)} weights missing or of the "
                f"wrong shape (e.g. {bad[0]}); re-save the model with save_pretrained()"
            )
        return cls(model, device, source=str(p), preprocessing=preprocessing)

    # preprocessing -------------------------------------------------------------------------------
    def preprocess(self, img: Image.Image) -> np.ndarray:
        """PIL image -> (H, W, 3) uint8: the processor's resize and centre crop, before rescale/normalise."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        pp = self.preprocessing
        if pp is None:
            return resize_center_crop(img, self.input_size)
        arr: np.ndarray
        if pp.resize is None:
            arr = np.asarray(img, dtype=np.uint8)
        else:
            how, val = pp.resize
            target = val if how == "exact" else shortest_edge_size(img.width, img.height, int(val))
            arr = resize_center_crop(img, target, resize_to=target, resample=pp.resample)  # type: ignore[arg-type]
        if pp.crop is not None:
            arr = _center_crop_floor(arr, pp.crop)
        return arr

    # attention -----------------------------------------------------------------------------------
    def _attention_modules(self) -> list[nn.Module]:
        base = getattr(self.model, "base_model", self.model)
        layers = getattr(base, "layers", None)
        if layers is None:
            layers = getattr(getattr(base, "encoder", None), "layer", None)
        if layers is None or len(layers) != self.num_layers:
            raise ModelLoadError(
                f"cannot find the {self.num_layers} encoder layers of {type(self.model).__name__} in this "
                "transformers version; siftlens expects model.layers or model.encoder.layer"
            )
        mods = [getattr(layer, "attention", None) for layer in layers]
        if any(m is None for m in mods):
            raise ModelLoadError(
                f"the encoder layers of {type(self.model).__name__} have no .attention module"
            )
        return mods  # type: ignore[return-value]

    def probes(self):
        """Per layer: the attention module; its output[1] is attn (B, h, S, S) in eager mode."""
        return [(m, _attention_output) for m in self._attention]

    @contextlib.contextmanager
    def eager(self):
        """Switch every config the attention modules read to the eager implementation; restore after."""
        configs = {id(self.model.config): self.model.config}
        for m in self._attention:
            c = getattr(m, "config", None)
            if c is not None:
                configs[id(c)] = c
        prev = [(c, c._attn_implementation) for c in configs.values()]
        try:
            for c, _ in prev:
                c._attn_implementation = "eager"
            yield
        finally:
            for c, impl in prev:
                c._attn_implementation = impl

    # forward -------------------------------------------------------------------------------------
    def model_kwargs(self, x: torch.Tensor) -> dict:
        """Extra inputs the HF model needs besides ``pixel_values`` x: (B, 3, H, W).

        ViT-MAE: ``noise`` (B, N) = 0..N-1 per row, so its argsort (the shuffle) is the identity and tokens
        stay in row-major patch order.
        """
        if self.model_type != "vit_mae":
            return {}
        B, N = x.shape[0], self.num_patches
        return {"noise": torch.arange(N, device=x.device, dtype=torch.float32).expand(B, N)}

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """x: (B, 3, H, W) -> logits (B, C) of a classifier (DeiT with teacher: averaged), else None."""
        out = self.model(pixel_values=x, **self.model_kwargs(x))
        return out.logits if self.is_classifier else None

    # interventions: what differs from the template in Backend -------------------------------------
    def token_module(self) -> nn.Module:
        """The embeddings module: its output has the position embeddings added (ViT-MAE: a tuple)."""
        base = getattr(self.model, "base_model", self.model)
        emb = getattr(base, "embeddings", None)
        if emb is None:
            raise ModelLoadError(f"cannot find the embeddings module of {type(self.model).__name__}")
        return emb

    def bias_module(self, layer: int) -> nn.Module:
        return self._attention[layer]

    def intervention_mode(self):
        """Attention implementations that ignore the mask (flash attention) run eager for the call."""
        impl = getattr(self.model.config, "_attn_implementation", "eager")
        return contextlib.nullcontext() if impl in ("eager", "sdpa") else self.eager()

    def describe(self) -> dict:
        d = super().describe()
        pp = self.preprocessing
        d.update({
            "hf_class": type(self.model).__name__,
            "model_type": self.model_type,
            "preprocessor": "defaulted" if pp is None else {
                "resize": None if pp.resize is None else [pp.resize[0], _jsonable(pp.resize[1])],
                "crop": None if pp.crop is None else list(pp.crop),
                "resample": pp.resample, "rescale": pp.scale,
                "image_mean": list(pp.mean), "image_std": list(pp.std),
            },
        })
        return d


# -- helpers reading the config ---------------------------------------------------------------------
def _unsupported(model_type: str) -> str:
    return (
        f"Hugging Face model_type '{model_type}' is not supported; siftlens supports: "
        + ", ".join(SUPPORTED_TYPES)
    )


def _model_class(transformers, config):
    """The *ForImageClassification* class named in config.architectures, else the base model class."""
    for name in config.architectures or []:
        if "ForImageClassification" in name:
            cls = getattr(transformers, name, None)
            if cls is None:
                raise ModelLoadError(f"this transformers version has no {name}; upgrade transformers")
            return cls
    return transformers.AutoModel


def _config_geometry(cfg) -> tuple[int, tuple[int, int]]:
    """(patch size P, config image size (H, W)); raises GeometryError when P does not divide it."""
    ph, pw = pair(cfg.patch_size, "patch_size")
    if ph != pw:
        raise GeometryError(f"non-square patches {ph}x{pw} are not supported")
    H, W = pair(cfg.image_size, "image_size")
    if H % ph or W % ph:
        raise GeometryError(
            f"the config's image size {H}x{W} is not divisible by its patch size {ph}; "
            "fix image_size in config.json"
        )
    return ph, (H, W)


def _input_size(
    model_type: str, P: int, config_hw: tuple[int, int], pp: HFPreprocessing | None
) -> tuple[int, int]:
    """(H, W) the model receives: what preprocessing outputs, checked against what the model accepts."""
    if pp is None:
        return config_hw
    out = pp.output_size()
    if out is None:
        raise GeometryError(
            "preprocessor_config.json gives images of varying size (no centre crop, no fixed resize); "
            "set do_center_crop with crop_size"
        )
    H, W = out
    if H % P or W % P:
        raise GeometryError(f"the preprocessor outputs {H}x{W}, which patch size {P} does not divide")
    if model_type in _INTERPOLATES_POSITIONS:
        gh, gw = config_hw[0] // P, config_hw[1] // P
        if (out != config_hw or H != W) and gh != gw:
            raise GeometryError(
                f"{model_type} resamples position embeddings from a square grid but config image_size is "
                f"{config_hw[0]}x{config_hw[1]}; make it square"
            )
    elif out != config_hw:
        raise GeometryError(
            f"the preprocessor outputs {H}x{W} but the model's position embeddings are for "
            f"{config_hw[0]}x{config_hw[1]}; make crop_size/size in preprocessor_config.json match image_size"
        )
    return out


def _prefix_tokens(cfg) -> int:
    """CLS, plus DeiT's distillation token or DINOv2's registers."""
    if cfg.model_type == "deit":
        return 2
    if cfg.model_type == "dinov2_with_registers":
        return 1 + int(cfg.num_register_tokens)
    return 1
