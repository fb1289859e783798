"""ResNet-12 source model: shapes, BatchNorm without running statistics, vmap, input ranks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

import autometa
from autometa import ConfigError, SearchConfig, TaskSpec
from autometa.engine.prepare import prepare
from autometa_plugins import maml, resnet12, sinusoid
from autometa_plugins.resnet12.model import ResNet12

SMALL = "4-8-12-16"  # widths that keep the tests fast; the architecture is the same


def spec(shape: tuple[int, ...], outputs: int = 5) -> TaskSpec:
    return TaskSpec("classification", shape, outputs)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 84, 84), (3, 5, 9)])
def test_shapes_for_several_input_sizes(shape):
    torch.manual_seed(0)
    model = ResNet12(channels=SMALL).build(spec(shape))
    x = torch.rand(3, *shape)
    assert model.features(x).shape == (3, 16)  # global average pooling: last block's width
    assert model(x).shape == (3, 5)


@pytest.mark.parametrize(("shape", "pools"), [((1, 8, 8), 3), ((1, 28, 28), 4), ((1, 1, 1), 0)])
def test_pooling_stops_at_one_pixel(shape, pools):
    model = ResNet12(channels=SMALL).build(spec(shape))
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == pools
    assert model(torch.rand(2, *shape)).shape == (2, 5)


@pytest.mark.parametrize(("channels", "dim"), [("64-160-320-640", 640), ("64-128-256-512", 512)])
def test_standard_widths(channels, dim):
    model = ResNet12(channels=channels).build(spec((1, 8, 8), 3))
    assert model.head.in_features == dim
    convs = [m for m in model.features.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 * 4  # 4 blocks x (3 convolutions + 1 shortcut)
    assert [c.out_channels for c in convs[3::4]] == [int(w) for w in channels.split("-")]


def test_default_is_metaoptnet_and_the_search_space_builds():
    assert ResNet12().channels == (64, 160, 320, 640)
    for choice in ResNet12.search_space()["channels"].choices:
        assert len(ResNet12(channels=choice).channels) == 4
    assert ResNet12(channels=[8, 8, 16, 16]).channels == (8, 8, 16, 16)


@pytest.mark.parametrize("bad", ["64-128", "a-b-c-d", "0-8-8-8", [1, 2, 3]])
def test_bad_widths_are_a_config_error(bad):
    with pytest.raises(ConfigError, match=r"resnet12\.channels: .* is not four positive"):
        ResNet12(channels=bad)


def test_batchnorm_keeps_no_running_statistics():
    model = ResNet12(channels=SMALL).build(spec((1, 8, 8)))
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 16
    assert all(not m.track_running_stats and m.running_mean is None for m in norms)
    assert not any("running" in key for key in model.state_dict())
    # Same statistics in train and eval mode: each batch is normalised by its own.
    x = torch.rand(4, 1, 8, 8)
    train_out = model(x)
    assert torch.allclose(model.eval()(x), train_out)


def test_leaky_relu_and_residual_structure():
    model = ResNet12(channels=SMALL).build(spec((1, 8, 8)))
    slopes = {m.negative_slope for m in model.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.1}
    assert len([m for m in model.modules() if isinstance(m, resnet12.model.ResidualBlock)]) == 4


def test_vmap_over_tasks_matches_a_loop():
    torch.manual_seed(0)
    model = ResNet12(channels=SMALL).build(spec((1, 8, 8)))
    params = dict(model.named_parameters())
    x = torch.rand(3, 5, 1, 8, 8)  # (tasks, examples, C, H, W)
    batched = vmap(lambda xi: functional_call(model, params, (xi,)))(x)
    looped = torch.stack([model(xi) for xi in x])
    assert torch.allclose(batched, looped, atol=1e-5)


def test_incompatibility_names_the_input_rank_and_a_remedy():
    assert ResNet12.incompatibility(spec((3, 84, 84))) is None
    reason = ResNet12.incompatibility(TaskSpec("regression", (4,), 1))
    assert reason == ("accepts inputs of rank [3], the task's inputs have shape [4] "
                      "(flat feature vectors: use the 'mlp' source model)")


def test_a_search_refuses_resnet12_on_flat_inputs_before_storing_anything(tmp_path):
    host = autometa.create_host(entry_points=False, plugins={
        "sinusoid": sinusoid, "maml": maml, "resnet12": resnet12})
    config = SearchConfig(task="sinusoid", sources=["resnet12"])
    with pytest.raises(ConfigError, match=r"source model 'resnet12' cannot be used here: it "
                                          r"accepts inputs of rank \[3\].*\[1\]"):
        prepare(config, host)
    assert not (tmp_path / "autometa.db").exists()
