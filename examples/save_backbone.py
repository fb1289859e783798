"""Write a backbone directory that the ``transformers`` source reads (README: Bring your own
backbone).

On a machine with internet, once: download a vision model and its image processor and
save both into one directory, then copy that directory to where the search runs (autometa
itself never contacts a hub)::

    python examples/save_backbone.py --hub facebook/dinov2-small dinov2-small
    python examples/save_backbone.py --hub google/vit-base-patch16-224-in21k vit-base
    python examples/save_backbone.py --hub openai/clip-vit-base-patch32 clip-b32

Anywhere, without internet: a small randomly initialised model of the same family, to try
the recipe end to end (its features are not pretrained, so expect no transfer)::

    python examples/save_backbone.py --tiny vit tiny-vit

Needs ``pip install 'autometa-ml[hf]'`` (transformers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def save_hub(name: str, out: Path) -> None:
    """The hub model ``name`` and its image processor, saved into ``out`` (downloads)."""
    from transformers import AutoImageProcessor, AutoModel

    AutoModel.from_pretrained(name).save_pretrained(out)
    AutoImageProcessor.from_pretrained(name).save_pretrained(out)


def save_tiny(family: str, out: Path, *, image_size: int = 32, seed: int = 0) -> None:
    """A small random ``family`` ("vit", "dinov2" or "clip") model with a processor whose
    mean and std are the family's published ones, saved into ``out`` (no download)."""
    import torch
    import transformers as hf

    torch.manual_seed(seed)
    size = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 64, "image_size": image_size, "patch_size": 8}
    if family == "vit":
        model = hf.ViTModel(hf.ViTConfig(**size))
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    elif family == "dinov2":
        model = hf.Dinov2Model(hf.Dinov2Config(**size))
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    elif family == "clip":
        model = hf.CLIPVisionModel(hf.CLIPVisionConfig(**size))
        mean = (0.48145466, 0.4578275, 0.40821073)
        std = (0.26862954, 0.26130258, 0.27577711)
    else:
        raise SystemExit(f"--tiny: {family!r} is not one of vit, dinov2, clip")
    model.save_pretrained(out)
    processor = hf.ViTImageProcessorPil(size={"height": image_size, "width": image_size},
                                        image_mean=list(mean), image_std=list(std))
    processor.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--hub", metavar="NAME", help="a model on the Hugging Face hub")
    which.add_argument("--tiny", choices=("vit", "dinov2", "clip"),
                       help="a small random model of this family (no download)")
    parser.add_argument("out", type=Path, help="the directory to write")
    args = parser.parse_args(argv)
    if args.hub:
        save_hub(args.hub, args.out)
    else:
        save_tiny(args.tiny, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
