"""Hugging Face Vision Transformers: ViT, DeiT, DINOv2 (+ registers), the ViT-MAE encoder, the CLIP, SigLIP and
SigLIP2 vision towers, BEiT and Data2Vec-vision (the families: :mod:`siftlens.models.hf_families`).

A model comes from a local ``save_pretrained`` folder, from a hub id through transformers' own
``from_pretrained`` (the user's cache, ``HF_HOME``; a download when the network is there; ``HF_HUB_OFFLINE``
honoured), or as a model object (:meth:`HFBackend.from_model`). Geometry comes from the model's config;
preprocessing from ``preprocessor_config.json`` or an image processor (:mod:`siftlens.models.hf_preprocess`),
or a plain resize + centre crop with ImageNet statistics when there is neither (recorded as "defaulted").

Attention is observed on each encoder layer's attention module, whose forward returns
``(attn_output, attn_weights)`` with ``attn_weights: (B, h, S, S)`` in the eager implementation only
(SDPA and flash attention return ``None`` there); :meth:`HFBackend.eager` switches the model to eager for
the duration of a capture.

Token order is ``[prefix tokens, patches in row-major order]``: ``S = T + g_h * g_w`` with T = 1 (CLS), 2 (DeiT),
1 + registers (DINOv2) or 0 (SigLIP).

Interventions (:meth:`~siftlens.models.backend.Backend.forward_intervened`): tokens are dropped from the
output of the embeddings module (position embeddings already added); the bias is added to each chosen
attention module's ``attention_mask``, which the eager and SDPA attention functions add to the logits. BEiT's
relative position bias travels in that mask; a drop gathers it with the tokens.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import GeometryError, ModelLoadError
from .backend import IMAGENET_MEAN, IMAGENET_STD, Backend, first_line, pair, resize_center_crop
from .hf_families import SUPPORTED_TYPES, Family, family, prefix_tokens, vision_config
from .hf_preprocess import HFPreprocessing
from .hub import commit_of, is_hub_id, load_error, quiet_transformers, split_revision

__all__ = ["SUPPORTED_TYPES", "HFBackend", "HFPreprocessing"]


def _attention_output(module, args, kwargs, output) -> torch.Tensor | None:
    """HF attention modules return (attn_output, attn_weights); weights are None outside eager."""
    if isinstance(output, tuple) and len(output) > 1:
        return output[1]
    return None


class HFBackend(Backend):
    """A Hugging Face ViT-family model (from a folder, a hub id or an object)."""

    kind = "hf"
    bias_arg = "attention_mask"  # the eager and SDPA attention functions add it to the logits
    bias_arg_needs = "transformers >= 5 (pip install -U transformers)"

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device = "cpu",
        source: str = "",
        preprocessing: HFPreprocessing | None = None,
        hub: dict | None = None,
    ):
        cfg = model.config
        self.family: Family = family(cfg.model_type)  # one line for Swin and the unsupported, before any move
        super().__init__(model, device)
        self.source = source
        self.hub = hub
        self.model_type: str = cfg.model_type
        vcfg = vision_config(cfg, self.family)
        self.vision = _vision_root(model)
        P, config_hw = _config_geometry(vcfg, self.family)
        self.patch_size = P
        self.input_size = _input_size(self.family, self.model_type, P, config_hw, preprocessing)
        self.grid_size = (self.input_size[0] // P, self.input_size[1] // P)
        self.num_prefix_tokens = prefix_tokens(cfg)
        self.has_cls = self.family.has_cls
        self.num_layers = int(vcfg.num_hidden_layers)
        self.num_heads = int(vcfg.num_attention_heads)
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
        if self.family.legacy:
            self.bias_arg = "relative_position_bias"  # added to the attention scores, like a mask
        self.check_geometry()

    # loading -------------------------------------------------------------------------------------
    @classmethod
    def load(cls, spec: str, device: str | torch.device = "cpu", revision: str | None = None) -> HFBackend:
        """A local ``save_pretrained`` folder, or a hub id ``org/name`` (``org/name@rev``, or ``revision``) loaded
        by transformers' ``from_pretrained``: from the cache, downloaded when online and not cached."""
        p = Path(spec).expanduser()
        if p.is_dir():
            if revision is not None:
                raise ModelLoadError(f"--revision applies to hub ids; {spec} is a local folder")
            if not (p / "config.json").is_file():
                raise ModelLoadError(f"{spec} has no config.json; pass a folder written by save_pretrained()")
            return cls._load(str(p), device, None, local=True)
        name, revision = split_revision(spec, revision)
        if p.exists() or not is_hub_id(name):
            raise ModelLoadError(
                f"model folder {spec} does not exist; pass a folder written by save_pretrained() or a hub id org/name"
            )
        return cls._load(name, device, revision, local=False)

    @classmethod
    def _load(cls, where: str, device, revision: str | None, local: bool) -> HFBackend:
        transformers = _import_transformers()
        kw: dict = {"local_files_only": True} if local else {"revision": revision}

        def failed(e: BaseException, what: str) -> ModelLoadError:
            if local:
                return ModelLoadError(f"could not load the {what} in {where}: {first_line(e)}")
            return load_error(e, where, revision, what)

        with quiet_transformers():
            try:
                config = transformers.AutoConfig.from_pretrained(where, **kw)
            except (OSError, ValueError, KeyError) as e:
                raise failed(e, "model config") from e
            fam = family(config.model_type)
            pp_file = Path(where) / "preprocessor_config.json" if local else _hub_file(transformers, where, revision)
            preprocessing = HFPreprocessing.read(pp_file) if pp_file is not None else None
            # geometry is checked before the (possibly large) weights are read
            P, config_hw = _config_geometry(vision_config(config, fam), fam)
            _input_size(fam, config.model_type, P, config_hw, preprocessing)
            model_cls, pass_config = _model_class(transformers, config, fam)
            if config.model_type == "vit_mae":
                config.mask_ratio = 0.0
            extra = {"config": config} if pass_config else {}
            try:
                model, info = model_cls.from_pretrained(
                    where, attn_implementation="eager", output_loading_info=True, **extra, **kw
                )
            except (OSError, ValueError, RuntimeError, KeyError) as e:
                raise failed(e, "model") from e
        missing = sorted(k for k in info.get("missing_keys", []) if "pooler." not in k)
        mismatched = list(info.get("mismatched_keys", []))
        if missing or mismatched:
            bad = missing or [str(m[0]) if isinstance(m, tuple) else str(m) for m in mismatched]
            raise ModelLoadError(
                f"{where} does not hold a complete {type(model).__name__}: {len(bad)} weights missing or of the "
                f"wrong shape (e.g. {bad[0]}); re-save the model with save_pretrained()"
            )
        if local:
            return cls(model, device, source=where, preprocessing=preprocessing)
        hub = {"repo": where, "revision": revision or "main", "commit": commit_of(where, "config.json", revision)}
        source = where if revision is None else f"{where}@{revision}"
        return cls(model, device, source=source, preprocessing=preprocessing, hub=hub)

    @classmethod
    def from_model(
        cls, model: nn.Module, device: str | torch.device = "cpu", processor=None, source: str | None = None
    ) -> HFBackend:
        """A transformers ``PreTrainedModel`` object. Preprocessing from ``processor`` (an image processor), else
        the ``preprocessor_config.json`` next to where the model was loaded from (a folder, or the hub cache:
        never a download), else defaulted. A CLIP or SigLIP model is used through its vision tower."""
        family(model.config.model_type)
        origin = str(getattr(model, "name_or_path", "") or "")
        if processor is not None:
            preprocessing = HFPreprocessing.from_processor(processor)
        else:
            preprocessing = _preprocessing_near(origin)
        name = source or f"object:{type(model).__name__}" + (f" ({origin})" if origin else "")
        return cls(model, device, source=name, preprocessing=preprocessing)

    # preprocessing -------------------------------------------------------------------------------
    def preprocess(self, img: Image.Image) -> np.ndarray:
        """PIL image -> (H, W, 3) uint8: the processor's resize and centre crop, before rescale/normalise."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        if self.preprocessing is None:
            return resize_center_crop(img, self.input_size)
        return self.preprocessing.apply(img)

    # attention -----------------------------------------------------------------------------------
    def _attention_modules(self) -> list[nn.Module]:
        root = self.vision
        encoder = getattr(root, "encoder", None)
        layers = getattr(root, "layers", None)
        for cand in (getattr(encoder, "layer", None), getattr(encoder, "layers", None)):
            layers = layers if layers is not None else cand
        if layers is None or len(layers) != self.num_layers:
            raise ModelLoadError(
                f"cannot find the {self.num_layers} encoder layers of {type(self.model).__name__} in this "
                "transformers version; siftlens expects .layers, .encoder.layer or .encoder.layers"
            )
        attr = self.family.attention_attr
        mods = [getattr(layer, attr, None) for layer in layers]
        if self.family.legacy:  # the self-attention inside: (context, probs) with output_attentions=True
            mods = [getattr(m, "attention", None) for m in mods]
        if any(m is None for m in mods):
            raise ModelLoadError(f"the encoder layers of {type(self.model).__name__} have no .{attr} module")
        return mods  # type: ignore[return-value]

    def probes(self):
        """Per layer: the attention module; its output[1] is attn (B, h, S, S) in eager mode."""
        return [(m, _attention_output) for m in self._attention]

    @contextlib.contextmanager
    def eager(self):
        """Switch every config the attention modules read to the eager implementation; restore after.

        Data2Vec-vision (the older layout): each SDPA self-attention becomes its eager parent class, and a
        pre-hook sets ``output_attentions=True``, for the duration of the block."""
        if self.family.legacy:
            with _legacy_eager(self._attention):
                yield
            return
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
        stay in row-major patch order. SigLIP2: one grid in ``spatial_shapes`` and no padding
        (``pixel_attention_mask=None``: every token attends to every token).
        """
        B, N = x.shape[0], self.num_patches
        if self.family.naflex:
            shapes = torch.tensor([list(self.grid_size)], device=x.device).expand(B, 2)
            return {"spatial_shapes": shapes, "pixel_attention_mask": None}
        if self.model_type != "vit_mae":
            return {}
        return {"noise": torch.arange(N, device=x.device, dtype=torch.float32).expand(B, N)}

    def model_inputs(self, x: torch.Tensor) -> dict:
        """Every input of the HF model for x: (B, 3, H, W); SigLIP2 takes the processor's patches
        (B, N, P * P * 3), flattened (row, column, channel) within a patch."""
        if self.family.naflex:
            B, _, H, W = x.shape
            P = self.patch_size
            x = x.reshape(B, 3, H // P, P, W // P, P).permute(0, 2, 4, 3, 5, 1).reshape(B, (H // P) * (W // P), -1)
        return {"pixel_values": x, **self.model_kwargs(x)}

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """x: (B, 3, H, W) -> logits (B, C) of a classifier (DeiT with teacher: averaged), else None (the vision
        tower alone runs)."""
        if self.is_classifier:
            return self.model(**self.model_inputs(x)).logits
        self.vision(**self.model_inputs(x))
        return None

    # interventions: what differs from the template in Backend -------------------------------------
    def token_module(self) -> nn.Module:
        """The embeddings module: its output has the position embeddings added (ViT-MAE: a tuple)."""
        emb = getattr(self.vision, "embeddings", None)
        if emb is None:
            raise ModelLoadError(f"cannot find the embeddings module of {type(self.model).__name__}")
        return emb

    def drop_hooks(self, keep_idx: torch.Tensor):
        """BEiT / Data2Vec-vision: the output of every relative position bias module (1, h, T + N, T + N), per
        layer or shared, is gathered to the kept tokens (B, h, T + K, T + K): each keeps its relative positions."""
        if not self.family.relative_bias:
            return []
        hook = _gather_bias_hook(keep_idx, self.num_prefix_tokens)
        return [(m, hook) for m in self.vision.modules() if type(m).__name__.endswith("RelativePositionBias")]

    def bias_module(self, layer: int) -> nn.Module:
        return self._attention[layer]

    def intervention_mode(self):
        """Attention implementations that ignore the mask (flash attention) run eager for the call."""
        cfg = getattr(self._attention[0], "config", None) or self.model.config
        impl = getattr(cfg, "_attn_implementation", "eager")
        return contextlib.nullcontext() if impl in ("eager", "sdpa") else self.eager()

    def describe(self) -> dict:
        d = super().describe()
        pp = self.preprocessing
        d.update({
            "hf_class": type(self.model).__name__,
            "model_type": self.model_type,
            "family": self.family.name,
            "preprocessor": "defaulted" if pp is None else pp.describe(),
        })
        if self.hub is not None:
            d["hub"] = dict(self.hub)
        if not self.has_cls:
            d["cls_row"] = "no CLS token: the 'CLS' metrics use the mean attention over patch queries"
        return d


# -- helpers ------------------------------------------------------------------------------------------
def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ModelLoadError(
            "Hugging Face models need `pip install transformers` (or `pip install siftlens[hf]`)"
        ) from e
    return transformers


def _hub_file(transformers, name: str, revision: str | None) -> Path | None:
    """The cached (or just downloaded) ``preprocessor_config.json`` of a hub model; None when it has none."""
    from transformers.utils import cached_file

    try:
        f = cached_file(name, "preprocessor_config.json", revision=revision,
                        _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError) as e:
        raise load_error(e, name, revision, "preprocessor config") from e
    return Path(f) if f else None


def _preprocessing_near(origin: str) -> HFPreprocessing | None:
    """``preprocessor_config.json`` where a model object was loaded from: its folder, or the local hub cache."""
    if not origin:
        return None
    p = Path(origin).expanduser()
    if p.is_dir():
        return HFPreprocessing.read(p)
    name, revision = split_revision(origin)
    if not is_hub_id(name):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        f = try_to_load_from_cache(name, "preprocessor_config.json", revision=revision)
    except Exception:  # noqa: BLE001 - a lookup in the cache only; no file is no preprocessing
        return None
    return HFPreprocessing.read(Path(f)) if isinstance(f, str) else None


def _vision_root(model: nn.Module) -> nn.Module:
    """The module holding ``embeddings`` and the encoder: a multimodal model's ``vision_model``, else the base."""
    v = getattr(model, "vision_model", None)
    if isinstance(v, nn.Module):
        return v
    return getattr(model, "base_model", model)


def _model_class(transformers, config, fam: Family):
    """(class to load, whether to pass the config): the *ForImageClassification* named in config.architectures,
    else the family's vision tower (CLIP, SigLIP: from the whole checkpoint), else the base model class."""
    for name in config.architectures or []:
        if "ForImageClassification" in name:
            cls = getattr(transformers, name, None)
            if cls is None:
                raise ModelLoadError(f"this transformers version has no {name}; upgrade transformers")
            return cls, True
    if fam.vision_class is not None:
        cls = getattr(transformers, fam.vision_class, None)
        if cls is None:
            raise ModelLoadError(f"this transformers version has no {fam.vision_class}; upgrade transformers")
        return cls, False
    return transformers.AutoModel, True


def _config_geometry(cfg, fam: Family) -> tuple[int, tuple[int, int]]:
    """(patch size P, config image size (H, W)); raises GeometryError when P does not divide it. SigLIP2 has
    no image size: its position grid is sqrt(num_patches) square."""
    ph, pw = pair(cfg.patch_size, "patch_size")
    if ph != pw:
        raise GeometryError(f"non-square patches {ph}x{pw} are not supported")
    if fam.naflex:
        g = math.isqrt(int(cfg.num_patches))
        return ph, (g * ph, g * ph)
    H, W = pair(cfg.image_size, "image_size")
    if H % ph or W % ph:
        raise GeometryError(
            f"the config's image size {H}x{W} is not divisible by its patch size {ph}; "
            "fix image_size in config.json"
        )
    return ph, (H, W)


def _input_size(
    fam: Family, model_type: str, P: int, config_hw: tuple[int, int], pp: HFPreprocessing | None
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
    if fam.naflex:
        return out
    if fam.interpolates:
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


def _gather_bias_hook(keep_idx: torch.Tensor, num_prefix: int):
    """Forward hook on a relative position bias module: its output (1 or B, h, T + N, T + N) -> the rows and
    columns of the prefix and the kept patches ``keep_idx`` (B, K), (B, h, T + K, T + K)."""

    def hook(module, args, output):
        B = keep_idx.shape[0]
        idx = torch.cat([torch.arange(num_prefix).expand(B, num_prefix), keep_idx.cpu() + num_prefix], 1)
        idx = idx.to(output.device)
        S = idx.shape[1]
        m = output.expand(B, *output.shape[1:])
        h = m.shape[1]
        m = torch.gather(m, 2, idx[:, None, :, None].expand(B, h, S, m.shape[3]))
        return torch.gather(m, 3, idx[:, None, None, :].expand(B, h, S, S))

    return hook


@contextlib.contextmanager
def _legacy_eager(modules: list[nn.Module]):
    """Older-layout self-attention modules: eager class, ``output_attentions=True`` (argument 1), restored after."""

    def ask_for_weights(module, args, kwargs):
        if len(args) > 1:
            return (args[0], True, *args[2:]), kwargs
        return args, {**kwargs, "output_attentions": True}

    classes = [type(m) for m in modules]
    handles = []
    try:
        for m in modules:
            if "Sdpa" in type(m).__name__:
                m.__class__ = type(m).__mro__[1]  # the eager parent: same parameters, softmax materialised
            handles.append(m.register_forward_pre_hook(ask_for_weights, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
        for m, c in zip(modules, classes, strict=True):
            m.__class__ = c
