"""The baselines on a frozen ViT with and without stored features, side by side.

A search whose only trials are frozen-feature ones (the three baselines on ``raw`` and on a
``checkpoint`` source holding a small random ViT from transformers, and one searched
nearest-centroid trial) on an image folder of ``--classes`` x ``--per-class`` images at
32 px, run three times in one process on the same data and weights: without the feature
store (``autometa.feature_store.disabled()``: every trial embeds every episode's images, as
before), with it from an empty cache (the store is built once, then shared), and with it
again (a later run: the store is read). Wall time of each search, and whether every
trial's meta-val and meta-test scores are the same.

    .venv/bin/python benchmarks/frozen_features.py            # ~5 min on 2 busy cores
    .venv/bin/python benchmarks/frozen_features.py --quick    # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from harness import environment, markdown_table, print_and_write, text_table
from torch import nn

RESULTS = Path(__file__).parent / "results"


class ViTFeatures(nn.Module):
    """A random ViT (transformers' ``ViTModel``, LayerNorm: per-example features) whose
    features are the [CLS] token's last hidden state: (n, 3, 32, 32) -> (n, hidden)."""

    def __init__(self, hidden: int = 192, layers: int = 6) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTModel

        config = ViTConfig(hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=max(1, hidden // 64),
                           intermediate_size=4 * hidden, image_size=32, patch_size=8)
        self.vit = ViTModel(config, add_pooling_layer=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=x).last_hidden_state[:, 0]


def run(tmp: Path, name: str, args: argparse.Namespace) -> tuple[float, dict[int, Any]]:
    import optuna

    import autometa

    start = time.perf_counter()
    autometa.search(
        "image-folder",
        task_params={"path": str(tmp / "images"), "size": 32, "ways": 5, "shots": 1,
                     "queries": 15, "val_episodes": args.val_episodes,
                     "test_episodes": args.test_episodes},
        algorithms=["nearest-centroid"], sources=["checkpoint"], n_trials=1, meta_steps=1,
        eval_every=1, study_name=name, cache_dir=str(tmp / "cache"), progress=False,
        storage=f"sqlite:///{tmp / 'studies.db'}", artifacts=str(tmp / f"art-{name}"),
        source_params={"checkpoint": {
            "path": str(tmp / "vit.pt"), "arch": "frozen_features:ViTFeatures",
            "arch_params": {"hidden": args.hidden, "layers": args.layers}}})
    seconds = time.perf_counter() - start
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp / 'studies.db'}")
    scores = {t.number: (t.value, t.user_attrs.get("val_scores"),
                         t.user_attrs.get("test_scores")) for t in study.trials}
    return seconds, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=25)
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--val-episodes", type=int, default=100)
    parser.add_argument("--test-episodes", type=int, default=600)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny settings")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.classes, args.per_class, args.val_episodes, args.test_episodes = 25, 16, 4, 6
        args.hidden, args.layers = 32, 1
    from data_scale_images import write_folder

    from autometa import feature_store

    with tempfile.TemporaryDirectory(prefix="autometa-frozen-") as name:
        tmp = Path(name)
        write_folder(tmp / "images", [args.per_class] * args.classes, size=32)
        torch.manual_seed(0)
        torch.save(ViTFeatures(args.hidden, args.layers).state_dict(), tmp / "vit.pt")
        with feature_store.disabled():
            plain_s, plain = run(tmp, "without", args)
        built_s, built = run(tmp, "with-store-built", args)
        again_s, again = run(tmp, "with-store-read", args)
    same = plain == built == again
    rows = [["without the store (before)", f"{plain_s:.1f}", "1.00x"],
            ["with it, built in this run", f"{built_s:.1f}", f"{plain_s / built_s:.2f}x"],
            ["with it, built before", f"{again_s:.1f}", f"{plain_s / again_s:.2f}x"]]
    headers = ["search (7 frozen-feature trials)", "wall s", "speed-up"]
    env = environment(["transformers"])
    setting = (f"{args.classes} classes x {args.per_class} images at 32 px; 5-way 1-shot 15 "
               f"queries; {args.val_episodes} meta-val + {args.test_episodes} meta-test "
               f"episodes; ViT hidden {args.hidden}, {args.layers} layers, patch 8")
    text = (f"{setting}\n{text_table(headers, rows)}\n"
            f"every trial's meta-val and meta-test scores identical: {same}")
    markdown = (f"# Frozen features: stored once against per episode\n\n{setting}.\n\n"
                f"{markdown_table(headers, rows)}\n\nEvery trial's meta-val and meta-test "
                f"scores identical in the three runs: {same}.\n\n`{' '.join(sys.argv)}`; "
                f"{env.get('cpu')}, torch threads {env.get('torch_threads')}.\n")
    payload = {"environment": env, "settings": vars(args) | {"out": str(args.out)},
               "seconds": {"without": plain_s, "built": built_s, "read": again_s},
               "identical_scores": same}
    print_and_write("frozen_features_quick" if args.quick else "frozen_features", payload,
                    text, markdown, args.out)


if __name__ == "__main__":
    main()
