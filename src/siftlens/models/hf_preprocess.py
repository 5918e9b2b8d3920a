"""What a Hugging Face image processor does to a PIL image, read from its saved settings.

The settings come from ``preprocessor_config.json`` (a folder or a hub snapshot) or from an image processor
object (its ``to_dict()``). :meth:`HFPreprocessing.apply` replicates HF's PIL pipeline up to the pixels the
model sees: resize, then centre crop with HF's floor offset; rescaling and normalisation are folded into the
backend's mean and std.

SigLIP2's NaFlex processor (``patch_size`` and ``max_num_patches`` instead of a size) resizes each image to
its own grid. siftlens needs one grid per run, so it uses the largest square grid the patch budget allows,
``g = floor(sqrt(max_num_patches))``: resize the shorter side to ``g * P`` and centre crop ``g * P`` square
(exactly what the processor does to a square image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ModelLoadError
from ..io import read_json
from .backend import IMAGENET_MEAN, IMAGENET_STD, pair, resize_center_crop, shortest_edge_size

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
    source: str  # "preprocessor_config.json", "image processor" or "defaulted"
    naflex_grid: int | None = None  # SigLIP2: the square grid side g chosen from max_num_patches

    def output_size(self) -> tuple[int, int] | None:
        """(H, W) of every preprocessed image, or None when it depends on the image."""
        if self.crop is not None:
            return self.crop
        if self.resize is not None and self.resize[0] == "exact":
            return self.resize[1]  # type: ignore[return-value]
        return None

    @classmethod
    def read(cls, file: Path) -> HFPreprocessing | None:
        """From a ``preprocessor_config.json`` (a path to the file, or to a folder holding it); None if absent."""
        f = file / "preprocessor_config.json" if file.is_dir() else file
        if not f.is_file():
            return None
        return cls.from_dict(read_json(f, "preprocessor config", error=ModelLoadError), source=f.name)

    @classmethod
    def from_processor(cls, processor) -> HFPreprocessing:
        """From an image processor object (``AutoImageProcessor``, a ``*ImageProcessor``) or a processor that
        holds one (``CLIPProcessor``: its ``image_processor``)."""
        proc = getattr(processor, "image_processor", processor)
        to_dict = getattr(proc, "to_dict", None)
        if not callable(to_dict):
            raise ModelLoadError(
                f"{type(processor).__name__} is not an image processor; pass the AutoImageProcessor of the model"
            )
        raw = dict(to_dict())
        raw.setdefault("image_processor_type", type(proc).__name__)
        return cls.from_dict(raw, source="image processor")

    @classmethod
    def from_dict(cls, raw: dict, source: str) -> HFPreprocessing:
        ptype = str(raw.get("image_processor_type") or raw.get("feature_extractor_type") or "")
        ptype = ptype.removesuffix("Pil")
        resize, crop, naflex = None, None, None
        if "max_num_patches" in raw and raw.get("size") is None:
            P, budget = int(raw.get("patch_size") or 16), int(raw["max_num_patches"])
            naflex = math.isqrt(budget)
            side = naflex * P
            resize, crop = ("shortest_edge", side), (side, side)
        elif raw.get("do_resize", True):
            resize = _resize(raw.get("size"), ptype, source)
        if naflex is None and raw.get("do_center_crop", False):
            crop = pair(raw.get("crop_size"), "crop_size")
        resample = raw.get("resample", _PIL_BILINEAR)
        if not isinstance(resample, int):
            raise ModelLoadError(f"{source}: resample={resample!r} is not a PIL filter number")
        scale = float(raw.get("rescale_factor", 1 / 255)) if raw.get("do_rescale", True) else 1.0
        if raw.get("do_normalize", True):
            mean = tuple(float(m) for m in _per_channel(raw.get("image_mean", IMAGENET_MEAN)))
            std = tuple(float(s) for s in _per_channel(raw.get("image_std", IMAGENET_STD)))
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return cls(resize, crop, int(resample), scale, mean, std, source=source, naflex_grid=naflex)

    def apply(self, img: Image.Image) -> np.ndarray:
        """PIL image -> (H, W, 3) uint8: the processor's resize and centre crop, before rescale/normalise."""
        arr: np.ndarray
        if self.resize is None:
            arr = np.asarray(img, dtype=np.uint8)
        else:
            how, val = self.resize
            target = val if how == "exact" else shortest_edge_size(img.width, img.height, int(val))  # type: ignore[arg-type]
            arr = resize_center_crop(img, target, resize_to=target, resample=self.resample)  # type: ignore[arg-type]
        if self.crop is not None:
            arr = center_crop_floor(arr, self.crop)
        return arr

    def describe(self) -> dict:
        d = {
            "from": self.source,
            "resize": None if self.resize is None else [self.resize[0], _jsonable(self.resize[1])],
            "crop": None if self.crop is None else list(self.crop),
            "resample": self.resample, "rescale": self.scale,
            "image_mean": list(self.mean), "image_std": list(self.std),
        }
        if self.naflex_grid is not None:
            d["naflex"] = (f"fixed {self.naflex_grid}x{self.naflex_grid} grid (the processor keeps each image's "
                           "aspect ratio; siftlens needs one grid per run)")
        return d


def _resize(size, ptype: str, source: str) -> tuple[str, object]:
    if isinstance(size, int):
        square = not any(ptype.startswith(p) for p in _SHORTEST_EDGE_PROCESSORS)
        return ("exact", (size, size)) if square else ("shortest_edge", size)
    if isinstance(size, dict) and size.get("height") is not None and size.get("width") is not None:
        return ("exact", (int(size["height"]), int(size["width"])))
    if isinstance(size, dict) and size.get("shortest_edge") is not None and not size.get("longest_edge"):
        return ("shortest_edge", int(size["shortest_edge"]))
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return ("exact", (int(size[0]), int(size[1])))
    raise ModelLoadError(f"{source}: size={size!r} is not supported; use {{height, width}} or {{shortest_edge}}")


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


def _per_channel(v) -> list[float]:
    return [v] * 3 if isinstance(v, (int, float)) else list(v)


def center_crop_floor(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
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
