"""transformers source model: tiny random ViT, DINOv2 and CLIP directories written with
save_pretrained, loaded through the registered entry point; features equal the library's
own model fed its own image processor's pixel values; refusals; functional gradients; a
search."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from limits import QUICK_SUBPROCESS

import autometa
from autometa import ConfigError, DataError, TaskSpec
from autometa.cli import main
from autometa.testing import check_source_model
from autometa_plugins import hf_transformers
from autometa_plugins.glyphs.task import Glyphs

transformers = pytest.importorskip("transformers")

SPEC = TaskSpec("classification", (3, 32, 32), 5)
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "image_size": 32, "patch_size": 8}
#: Not any library default: normalisation must really come from the directory.
MEAN, STD = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]
SMALL_GLYPHS = {"ways": 3, "shots": 1, "queries": 2, "val_episodes": 2, "test_episodes": 2,
                "train_classes": 12, "val_classes": 6, "test_classes": 6, "examples": 5}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """save_pretrained directories: model, and its image processor at the model's size."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    t = transformers
    vision = dict(TINY)
    t.ViTModel(t.ViTConfig(**TINY), add_pooling_layer=False).save_pretrained(root / "vit")
    t.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD
                        ).save_pretrained(root / "vit")
    t.Dinov2Model(t.Dinov2Config(**TINY)).save_pretrained(root / "dinov2")
    t.BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                        image_mean=MEAN, image_std=STD).save_pretrained(root / "dinov2")
    text = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 64, "vocab_size": 100, "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 1}
    clip = t.CLIPModel(t.CLIPConfig(vision_config=vision, text_config=text, projection_dim=16))
    clip.save_pretrained(root / "clip")
    t.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                         image_mean=MEAN, image_std=STD).save_pretrained(root / "clip")
    t.BertModel(t.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, vocab_size=100)).save_pretrained(root / "bert")
    return root


def source(**settings):
    """The source model as the engine gets it: through the installed entry point."""
    return autometa.create_host().get("source", "transformers").load()(**settings)


def reference(directory, name: str, x: torch.Tensor) -> torch.Tensor:
    """The library's own pooled features for images ``x`` in [0, 1] at the model's size."""
    t = transformers
    processor = t.AutoImageProcessor.from_pretrained(directory, local_files_only=True)
    pixels = processor(images=list(x), do_rescale=False, do_resize=False,
                       do_center_crop=False, input_data_format="channels_first",
                       return_tensors="pt")["pixel_values"]
    cls = t.CLIPVisionModel if name == "clip" else t.AutoModel
    model = cls.from_pretrained(directory, local_files_only=True).eval()
    with torch.no_grad():
        out = model(pixel_values=pixels)
    return out.pooler_output if name == "clip" else out.last_hidden_state[:, 0]


@pytest.mark.parametrize("name, pooling", [("vit", "cls"), ("dinov2", "cls"),
                                           ("clip", "pooler")])
def test_features_equal_the_librarys_own(dirs, name, pooling):
    model = source(path=str(dirs / name))
    assert (model.pooling, model.width, model.size) == (pooling, 32, (32, 32))
    features = model.build(SPEC).features.eval()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = features(x)
    torch.testing.assert_close(got, reference(dirs / name, name, x))
    with torch.no_grad():  # grayscale: the same as its 3-channel copy
        torch.testing.assert_close(features(x[:, :1]), features(x[:, :1].expand(-1, 3, -1, -1)))


def test_mean_pooling_and_no_normalisation(dirs):
    plain = source(path=str(dirs / "dinov2"), pooling="mean", normalize=False)
    features = plain.build(SPEC).features.eval()
    x = torch.rand(2, 3, 32, 32)
    net = transformers.AutoModel.from_pretrained(dirs / "dinov2", local_files_only=True)
    with torch.no_grad():
        torch.testing.assert_close(features(x),
                                   net(pixel_values=x).last_hidden_state[:, 1:].mean(1))


def test_a_safetensors_file_and_another_size(dirs, tmp_path):
    direct = source(path=str(dirs / "vit" / "model.safetensors")).build(SPEC).features.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(direct(x), reference(dirs / "vit", "vit", x))
    (tmp_path / "config.json").write_bytes((dirs / "clip" / "config.json").read_bytes())
    renamed = tmp_path / "weights.safetensors"
    renamed.write_bytes((dirs / "clip" / "model.safetensors").read_bytes())
    clip = source(path=str(renamed)).build(SPEC).features.eval()
    with torch.no_grad():  # no preprocessor_config.json here: CLIP's own mean/std
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        tower = transformers.CLIPVisionModel.from_pretrained(dirs / "clip",
                                                             local_files_only=True)
        torch.testing.assert_close(clip(x), tower(pixel_values=(x - mean) / std).pooler_output)
    bigger = source(path=str(dirs / "vit"), size=48).build(SPEC)  # position embeddings
    assert bigger(torch.rand(2, 1, 28, 28)).shape == (2, 5)  # interpolated


def test_refusals_are_one_line(dirs, tmp_path):
    with pytest.raises(ConfigError, match=r"^transformers.path 'facebook/dinov2-small' looks "
                                          r"like a Hugging Face hub name.*save_pretrained"):
        source(path="facebook/dinov2-small")
    with pytest.raises(ConfigError, match=r"^transformers.path '.*nope' does not exist"):
        source(path=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"no model directory given"):
        source()
    with pytest.raises(ConfigError, match=r"has no config.json"):
        source(path=str(tmp_path))
    with pytest.raises(ConfigError, match=r"holds a 'bert' model, which has no vision tower"):
        source(path=str(dirs / "bert"))
    with pytest.raises(DataError, match=r"lacks 2 tensor\(s\) of the ViTModel \(e\.g\. "
                                        r"'pooler\.dense\.bias'\)"):
        source(path=str(dirs / "vit"), pooling="pooler")  # saved without ViT's pooler
    with pytest.raises(ConfigError, match=r"transformers.pooling: expected one of"):
        source(path=str(dirs / "vit"), pooling="max")
    with pytest.raises(ConfigError) as refused:
        source(path="facebook/dinov2-small")
    assert "\n" not in str(refused.value)


def test_cli_refuses_a_hub_name_with_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["run", "--task", "glyphs", "--sources", "transformers", "--param",
                 "transformers.path=facebook/dinov2-small", "--algorithms", "protonet",
                 "--trials", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "'facebook/dinov2-small' looks like a Hugging Face hub name" in err
    assert not (tmp_path / "autometa.db").exists()


def test_conformance_kit(dirs):
    cls = autometa.create_host().get("source", "transformers").load()
    task = Glyphs(**SMALL_GLYPHS, device="cpu")
    check_source_model(cls, task, path=str(dirs / "vit"))


def test_maml_style_functional_gradient_over_every_parameter(dirs):
    model = source(path=str(dirs / "vit")).build(SPEC)
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    y = torch.arange(6) % 5
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p):
        logits = torch.func.functional_call(model, p, (x,))
        return torch.nn.functional.cross_entropy(logits, y)

    grads = torch.func.grad(loss)(params)
    loss(dict(model.named_parameters())).backward()  # the reference: plain autograd
    assert grads.keys() == params.keys() and len(grads) > 30
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)
    assert all(bool(g.abs().sum() > 0) for g in grads.values())  # every weight is used
    # Train and eval modes compute the same: the tiny configs have no dropout, as ViT's.
    model.train()
    with torch.no_grad():
        trained = model(x)
        torch.testing.assert_close(trained, model.eval()(x))


@pytest.mark.parametrize("adapter", ["none", "lora"])
def test_second_order_maml_needs_eager_attention_the_default(dirs, adapter):
    """A second-order meta-gradient differentiates the inner gradient: transformers' eager
    attention allows it; PyTorch's fused attention ("sdpa") has no double backward, and
    MAML says so in one line."""
    from autometa_plugins.digits.task import Digits
    from autometa_plugins.maml.algorithm import MAML

    task = Digits(ways=5, shots=1, queries=2, val_episodes=2, test_episodes=2)
    x = torch.rand(2, 10, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    y = torch.arange(5).repeat(2, 2)[:, :10]
    batch = autometa.Episodes(x[:, :5], y[:, :5], x[:, 5:], y[:, 5:])
    for attention in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = source(path=str(dirs / "vit"), attention=attention).build(SPEC)
        maml = MAML(model, task, first_order=False, meta_batch_size=2, adapter=adapter)
        if attention == "eager":
            assert math.isfinite(maml.meta_step(batch))
        else:
            with pytest.raises(autometa.ConfigError, match=r"^maml: a second-order "
                               r"meta-gradient through fused scaled-dot-product attention"):
                maml.meta_step(batch)


@pytest.mark.parametrize("name", ["vit", "dinov2", "clip"])
def test_maml_with_lora_adapters_on_each_family(dirs, name):
    """``maml.adapter=lora`` on each family's attention: adapters on the query, key and
    value projections of every layer; a meta-step moves them and the head only."""
    from autometa_plugins.digits.task import Digits
    from autometa_plugins.maml.algorithm import MAML

    task = Digits(ways=5, shots=1, queries=2, val_episodes=2, test_episodes=2)
    x = torch.rand(2, 10, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    y = torch.arange(5).repeat(2, 2)[:, :10]
    batch = autometa.Episodes(x[:, :5], y[:, :5], x[:, 5:], y[:, 5:])
    torch.manual_seed(0)
    model = source(path=str(dirs / name)).build(SPEC)
    maml = MAML(model, task, first_order=False, meta_batch_size=2, adapter="lora",
                lora_rank=2)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    adapters = [k for k in before if "lora_" in k]
    assert len(adapters) == 2 * 3 * TINY["num_hidden_layers"]  # A and B on q, k, v
    assert math.isfinite(maml.meta_step(batch))
    moved = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert moved and moved <= {*adapters, "head.weight", "head.bias"}
    assert any("lora_B" in k for k in moved)  # B starts at zero and is learned


def test_a_search_ranks_a_protonet_trial(dirs, autometa_search):
    board = autometa_search("glyphs", task_params=SMALL_GLYPHS, sources=["transformers"],
                            source_params={"transformers": {"path": str(dirs / "vit")}},
                            algorithms=["protonet"], n_trials=1, meta_steps=2, eval_every=1)
    frame = board.frame
    ours = frame[frame["algorithm"] == "protonet"]
    assert list(ours["source"]) == ["transformers"]  # the one meta-trained trial, ranked
    assert ours["rank"].notna().all() and ours.filter(like="val_").notna().all(axis=None)
    # Its features count as pretrained: the frozen baselines run on them too.
    assert "nearest-centroid" in set(frame[frame["source"] == "transformers"]["algorithm"])


# -- without transformers ----------------------------------------------------------------
def test_listed_as_unavailable_without_importing_torch():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import autometa\n"
        "from autometa_plugins import hf_transformers as hf\n"
        "host = autometa.create_host(entry_points=False, plugins={'transformers': hf})\n"
        "print('torch' in sys.modules, host.get('source', 'transformers').description)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=QUICK_SUBPROCESS).stdout
    assert out.startswith("False ")
    assert ("unavailable: transformers is not installed (pip install 'autometa-ml[hf]')"
            in out)


def test_incompatibility_names_the_install_line(monkeypatch):
    from autometa_plugins.hf_transformers.model import TransformersModel

    assert TransformersModel.incompatibility(TaskSpec("classification", (2, 8, 8), 5)) == (
        "needs 1- or 3-channel images, the task's have 2")
    assert "accepts inputs of rank [3]" in TransformersModel.incompatibility(
        TaskSpec("regression", (4,), 1))
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert hf_transformers.missing_reason() is not None
    assert TransformersModel.incompatibility(SPEC) == (
        "needs transformers, which is not installed: pip install 'autometa-ml[hf]'")


def test_small_task_images_are_warned_about_once(dirs, caplog):
    """Images decoded far below the model's input size (image-folder's default is 28 px)
    are upsampled inside the model: one warning says how to decode them larger."""
    import logging

    small = TaskSpec("classification", (3, 12, 12), 5)
    model = source(path=str(dirs / "vit"))
    with caplog.at_level(logging.WARNING, logger="autometa_plugins.hf_transformers.model"):
        model.build(small)
        model.build(small)
        model.build(SPEC)  # at the model's size: nothing to say
    warned = [r.getMessage() for r in caplog.records if "resized up" in r.getMessage()]
    assert warned == [f"transformers: the task's 12x12 images are resized up to 32x32 for "
                      f"{dirs / 'vit'}; decode them nearer the model's size (image-folder "
                      f"and the benchmark tasks: --task-param size=32)"]
