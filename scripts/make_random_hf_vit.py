"""Save a randomly initialised Hugging Face ViT to a local folder (for offline tests and benchmarks).

    python scripts/make_random_hf_vit.py OUT_DIR [--size s|b] [--seed 0]

``s``: ViT-S/16 (224, 12 layers, 6 heads, width 384); ``b``: ViT-B/16 (width 768, 12 heads).
The folder holds config.json, model.safetensors and preprocessor_config.json (resize to 224, ImageNet
mean/std), so ``siftlens analyze --model OUT_DIR`` loads it with no network.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    from transformers import ViTConfig, ViTForImageClassification

    try:
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:  # transformers 4.x
        from transformers import ViTImageProcessor as Processor

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--size", choices=["s", "b"], default="s")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    width, heads = (384, 6) if a.size == "s" else (768, 12)
    torch.manual_seed(a.seed)
    cfg = ViTConfig(image_size=224, patch_size=16, hidden_size=width, num_hidden_layers=12, num_attention_heads=heads,
                    intermediate_size=4 * width, num_labels=1000)
    model = ViTForImageClassification(cfg).eval()
    model.save_pretrained(a.out)
    Processor(size={"height": 224, "width": 224}, image_mean=[0.485, 0.456, 0.406],
              image_std=[0.229, 0.224, 0.225]).save_pretrained(a.out)
    print(f"saved random ViT-{a.size.upper()}/16 ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) "
          f"to {a.out}")


if __name__ == "__main__":
    main()
