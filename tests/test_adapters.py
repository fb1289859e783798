"""autometa.adapters: LoRA on a Backbone's features, in MAML, ANIL, Meta-SGD and fine-tuning.

The meta-gradient of a LoRA MAML step is checked against a float64 reference written
without peft and without autometa's inner loop: each adapted projection's weight is
``W + (alpha / r) B A`` (the same map as peft's ``W x + (alpha / r) B A x``) in a plain copy
of the network, and the inner SGD steps are ``torch.autograd.grad`` with
``create_graph=True``.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from autometa import Backbone, ConfigError, Episodes, SourceModel, TaskSpec  # noqa: E402
from autometa.adapters import AdaptedNames, add_lora, lora_target_modules  # noqa: E402
from autometa.inner_loop import Strategy, meta_backward  # noqa: E402
from autometa.testing import check_meta_algorithm  # noqa: E402
from autometa_plugins.anil.algorithm import ANIL  # noqa: E402
from autometa_plugins.conv4.model import Conv4  # noqa: E402
from autometa_plugins.digits.task import Digits  # noqa: E402
from autometa_plugins.finetune.algorithm import FineTune  # noqa: E402
from autometa_plugins.maml.algorithm import MAML  # noqa: E402
from autometa_plugins.metasgd.algorithm import MetaSGD  # noqa: E402
from autometa_plugins.mlp.model import MLP  # noqa: E402
from autometa_plugins.sinusoid.task import Sinusoid  # noqa: E402

RANK, ALPHA = 2, 3.0
TASK = {"ways": 3, "shots": 1, "queries": 2, "val_episodes": 4, "test_episodes": 4}


class PooledCLS(nn.Module):
    """A transformers ViTModel as features: (n, C, H, W) -> the last layer's CLS token (n, d)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: Tensor) -> Tensor:
        return self.vit(pixel_values=x).last_hidden_state[:, 0]


def tiny_vit(ways: int = 3, seed: int = 0) -> Backbone:
    """A 2-layer ViT on Digits' 1x8x8 images. Eager attention: the CPU's fused
    scaled-dot-product attention has no double backward (second-order MAML needs one)."""
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=32, image_size=8, patch_size=4,
                                    num_channels=1, attn_implementation="eager")
    torch.manual_seed(seed)
    return Backbone(PooledCLS(transformers.ViTModel(config, add_pooling_layer=False)),
                    nn.Linear(16, ways))


class TinyViT(SourceModel):
    """The tiny ViT as a source model, for the conformance kit."""

    def build(self, spec: TaskSpec) -> Backbone:
        return tiny_vit(spec.output_size)


@pytest.fixture(scope="module")
def digits() -> Digits:
    return Digits(**TASK)


def batch(task: Digits, dtype: torch.dtype = torch.float64) -> Episodes:
    ep = task.sample(2, torch.Generator().manual_seed(1))
    return Episodes(ep.support_x.to(dtype), ep.support_y, ep.query_x.to(dtype), ep.query_y)


# --- (a, b) the meta-gradient against a hand-written float64 reference ------------------------

def reference_meta_gradient(plain: Backbone, lora: dict[str, tuple[Tensor, Tensor]],
                            head: dict[str, Tensor], episodes: Episodes, *, steps: int,
                            lr: float, first_order: bool) -> dict[str, Tensor]:
    """d(mean query loss after ``steps`` SGD steps on A, B and the head) / d(initial A, B,
    head), by plain autograd on ``W x + (alpha/r) B A x`` written as the merged weight.

    ``lora``: {name of an adapted Linear in ``plain``: (A (r, in), B (out, r))}.
    """
    scale = ALPHA / RANK
    base = {n: p.detach() for n, p in plain.named_parameters()}
    init = {**{f"{m}.A": a for m, (a, _) in lora.items()},
            **{f"{m}.B": b for m, (_, b) in lora.items()}, **head}
    init = {n: t.detach().clone().requires_grad_() for n, t in init.items()}

    def forward(p: dict[str, Tensor], x: Tensor) -> Tensor:
        weights = dict(base)
        for m in lora:
            weights[f"{m}.weight"] = base[f"{m}.weight"] + scale * p[f"{m}.B"] @ p[f"{m}.A"]
        weights["head.weight"], weights["head.bias"] = p["head.weight"], p["head.bias"]
        return functional_call(plain, weights, (x,))

    total = torch.zeros((), dtype=torch.float64)
    for sx, sy, qx, qy in zip(episodes.support_x, episodes.support_y, episodes.query_x,
                              episodes.query_y, strict=True):
        fast = dict(init)
        for _ in range(steps):
            grads = torch.autograd.grad(F.cross_entropy(forward(fast, sx), sy),
                                        list(fast.values()), create_graph=not first_order)
            fast = {n: p - lr * (g.detach() if first_order else g)
                    for (n, p), g in zip(fast.items(), grads, strict=True)}
        total = total + F.cross_entropy(forward(fast, qx), qy)
    grads = torch.autograd.grad(total / len(episodes), list(init.values()))
    return dict(zip(init, grads, strict=True))


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_lora_maml_meta_gradient_equals_the_reference(digits: Digits, first_order: bool,
                                                      strategy: Strategy) -> None:
    model = tiny_vit().double()
    plain = copy.deepcopy(model)  # the reference's network: no peft in it
    algo = MAML(model, digits, adapter="lora", lora_rank=RANK, lora_alpha=ALPHA, inner_steps=2,
                inner_lr=0.3, meta_batch_size=2, first_order=first_order, strategy=strategy)
    targets = lora_target_modules(plain.features, "attention")
    assert len(targets) == 6  # q, k, v in each of the 2 layers
    torch.manual_seed(3)
    with torch.no_grad():  # B is zero at init: make it non-zero, so A's gradient is informative
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                assert not p.any()
                p.normal_(0, 0.3)
    params = dict(model.named_parameters())
    lora = {f"features.{m}": (params[f"features.{m}.lora_A.default.weight"],
                              params[f"features.{m}.lora_B.default.weight"]) for m in targets}
    head = {"head.weight": params["head.weight"], "head.bias": params["head.bias"]}
    episodes = batch(digits)
    expected = reference_meta_gradient(plain, lora, head, episodes, steps=2, lr=0.3,
                                       first_order=first_order)

    meta_backward(model, episodes, digits.loss, **algo.inner_loop_options())
    for m, (a, b) in lora.items():
        torch.testing.assert_close(a.grad, expected[f"{m}.A"], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(b.grad, expected[f"{m}.B"], rtol=1e-9, atol=1e-12)
    for n, p in head.items():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-9, atol=1e-12)
    assert any(bool(a.grad.abs().sum() > 0) for a, _ in lora.values())

    # A meta-step: the base weights get no gradient and stay; adapters and head move.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    algo.meta_step(episodes)
    for name, p in model.named_parameters():
        if algo.adapt_only(name):
            assert p.requires_grad and not torch.equal(p, before[name]), name
        else:
            assert not p.requires_grad and p.grad is None, name
            assert torch.equal(p, before[name]), name


# --- what is trained and adapted ---------------------------------------------------------------

def test_add_lora_freezes_the_features_and_names_what_trains() -> None:
    model = tiny_vit()
    torch.manual_seed(0)
    a = add_lora(model, rank=RANK, alpha=ALPHA)
    other = tiny_vit()
    torch.manual_seed(0)
    b = add_lora(other, rank=RANK, alpha=ALPHA)
    assert isinstance(a, AdaptedNames) and a == b
    assert {n for n, p in model.named_parameters() if p.requires_grad} == a.names
    assert {n for n in a.names if "lora_" not in n} == {"head.weight", "head.bias"}
    assert len([n for n in a.names if ".lora_A." in n]) == 6
    for (name, p), q in zip(model.named_parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q), name  # the same draw from the same seed
        if ".lora_B." in name:
            assert not p.any(), name  # the adapted network starts as the original
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(model(x), tiny_vit()(x))


def test_anil_with_lora_adapts_the_head_and_meta_learns_adapters_and_head(digits: Digits
                                                                         ) -> None:
    model = tiny_vit()
    algo = ANIL(model, digits, adapter="lora", lora_rank=RANK, meta_batch_size=2)
    adapted = [n for n, _ in model.named_parameters() if algo.adapt_only(n)]
    assert adapted == ["head.weight", "head.bias"]
    trained = {id(p) for group in algo.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in model.parameters() if p.requires_grad}
    assert any(".lora_A." in n for n, p in model.named_parameters() if id(p) in trained)


def test_metasgd_with_lora_learns_rates_for_adapters_and_head(digits: Digits) -> None:
    algo = MetaSGD(tiny_vit(), digits, adapter="lora", lora_rank=RANK, meta_batch_size=2)
    assert isinstance(algo.inner_lr, dict)
    assert set(algo.inner_lr) == {n for n, p in algo.model.named_parameters()
                                  if p.requires_grad}
    assert all(".lora_" in n or n.startswith("head.") for n in algo.inner_lr)


# --- (c) a step and a state round trip, as the engine runs them --------------------------------

@pytest.mark.parametrize("cls", [MAML, ANIL, MetaSGD])
def test_conforms_with_lora(digits: Digits, cls: type) -> None:
    # meta_step changes the model, adapt_and_predict leaves it, and a state_dict round trip
    # into a freshly built algorithm (as the engine restores a trial) predicts the same.
    check_meta_algorithm(cls, digits, TinyViT, adapter="lora", lora_rank=RANK,
                         meta_batch_size=2, inner_steps=1)


def test_state_round_trip_restores_adapters_and_rates(digits: Digits) -> None:
    algo = MetaSGD(tiny_vit(), digits, adapter="lora", lora_rank=RANK, meta_batch_size=2)
    algo.meta_step(batch(digits, torch.float32))
    buffer = io.BytesIO()
    torch.save(algo.state_dict(), buffer)
    buffer.seek(0)
    restored = MetaSGD(tiny_vit(seed=5), digits, adapter="lora", lora_rank=RANK,
                       meta_batch_size=2)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for (name, p), q in zip(algo.model.state_dict().items(),
                            restored.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert isinstance(restored.inner_lr, dict) and isinstance(algo.inner_lr, dict)
    for name, lr in algo.inner_lr.items():
        assert torch.equal(lr, restored.inner_lr[name]), name


# --- (d) fine-tuning with LoRA --------------------------------------------------------------

@pytest.mark.parametrize("finetune", ["head", "all"])
def test_finetune_with_lora_trains_adapters_and_classifier(digits: Digits, finetune: str
                                                           ) -> None:
    model = tiny_vit()
    algo = FineTune(model, digits, adapter="lora", lora_rank=RANK, finetune=finetune,
                    finetune_steps=3, batch_size=8)
    trained = {id(p) for group in algo.optimizer.param_groups for p in group["params"]}
    assert trained == ({id(p) for n, p in model.features.named_parameters() if ".lora_" in n}
                       | {id(p) for p in algo.train_head.parameters()})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):  # the first step moves B only: A's gradient is zero while B is
        algo.meta_step(batch(digits, torch.float32))
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (".lora_" in name), name  # the model's head is not trained here
    trained_state = {n: p.detach().clone() for n, p in model.named_parameters()}
    episodes = digits.meta_val()[:2]
    model.eval()
    pred = algo.adapt_and_predict(episodes)
    assert pred.shape == (2, episodes.query_x.shape[1], TASK["ways"])
    for name, p in model.named_parameters():  # fine-tuning fits a copy
        assert torch.equal(p, trained_state[name]), name


def test_finetune_all_with_lora_fits_only_adapters_and_the_new_head(digits: Digits) -> None:
    # Fine-tuning the adapters changes predictions; with a zero step the prediction is the
    # fresh classifier's on the unchanged features, as for finetune="head".
    model = tiny_vit()
    common: dict[str, Any] = {"adapter": "lora", "lora_rank": RANK, "optimizer": "sgd",
                              "momentum": 0.0, "weight_decay": 0.0, "finetune_steps": 2}
    episodes = digits.meta_val()[:2]
    still = FineTune(model, digits, finetune="all", finetune_lr=0.0, **common)
    # The same model's features carry LoRA now: a second algorithm on them is refused.
    with pytest.raises(ConfigError, match="already carry LoRA"):
        FineTune(model, digits, finetune="head", **common)
    head_only = FineTune(tiny_vit(), digits, finetune="head", finetune_lr=0.0, **common)
    torch.testing.assert_close(still.adapt_and_predict(episodes),
                               head_only.adapt_and_predict(episodes))
    moving = FineTune(tiny_vit(), digits, finetune="all", finetune_lr=0.5, **common)
    with torch.no_grad():
        for name, p in moving.model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.3)  # so that A's gradient is not zero either
    assert not torch.allclose(moving.adapt_and_predict(episodes),
                              head_only.adapt_and_predict(episodes))


# --- (e) errors users see -----------------------------------------------------------------

def test_attention_targets_on_a_conv_backbone_is_one_line_with_the_fix(digits: Digits) -> None:
    conv = Conv4(channels=4).build(digits.spec)
    with pytest.raises(ConfigError, match=r"maml.lora_targets='attention' matches no layer .*"
                                          r"set maml.lora_targets=linear") as info:
        MAML(conv, digits, adapter="lora")
    assert "\n" not in str(info.value)
    # "linear" adapts every convolution and Linear of the features.
    conv = Conv4(channels=4).build(digits.spec)
    algo = MAML(conv, digits, adapter="lora", lora_targets="linear", meta_batch_size=2)
    assert len([n for n in algo.model.state_dict() if ".lora_A." in n]) == 4
    algo.meta_step(batch(digits, torch.float32))


@pytest.mark.parametrize(("settings", "message"), [
    ({"adapter": "qlora"}, r"maml.adapter: 'qlora' is not one of 'none', 'lora'"),
    ({"adapter": "lora", "lora_rank": 0}, r"maml.lora_rank: expected a positive integer"),
    ({"adapter": "lora", "lora_alpha": -1.0}, r"maml.lora_alpha: expected a positive"),
    ({"adapter": "lora", "lora_targets": "mlp"}, r"maml.lora_targets: 'mlp' is not one of"),
])
def test_bad_settings_are_refused(digits: Digits, settings: dict[str, Any], message: str
                                  ) -> None:
    with pytest.raises(ConfigError, match=message):
        MAML(tiny_vit(), digits, **settings)


def test_second_order_through_fused_attention_is_one_line_with_the_fix(digits: Digits
                                                                       ) -> None:
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, image_size=8, patch_size=4,
                                    num_channels=1, attn_implementation="sdpa")

    def fused() -> Backbone:
        return Backbone(PooledCLS(transformers.ViTModel(config, add_pooling_layer=False)),
                        nn.Linear(16, 3))

    algo = MAML(fused(), digits, adapter="lora", lora_rank=RANK, meta_batch_size=2)
    with pytest.raises(ConfigError, match=r"^maml: a second-order meta-gradient through fused "
                                          r"scaled-dot-product attention .* first_order=True, "
                                          r"or load the model with attn_implementation='eager' "
                                          r"\(the transformers source's default"):
        algo.meta_step(batch(digits, torch.float32))
    first = MAML(fused(), digits, adapter="lora", lora_rank=RANK, meta_batch_size=2,
                 first_order=True)
    assert first.meta_step(batch(digits, torch.float32)) > 0


def test_missing_peft_is_one_line_with_the_install(digits: Digits,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "peft", None)  # import peft fails
    with pytest.raises(ConfigError, match=r"^adapter 'lora' needs peft: pip install "
                                          r"'autometa-ml\[hf\]'$"):
        MAML(tiny_vit(), digits, adapter="lora")
    MAML(tiny_vit(), digits)  # the default never imports peft


def test_finetune_conforms_with_lora(digits: Digits) -> None:
    check_meta_algorithm(FineTune, digits, TinyViT, adapter="lora", lora_rank=RANK,
                         finetune="all", finetune_steps=3, batch_size=8)
    # Regression: the adapters and the model's own head are trained and fine-tuned.
    sinusoid = Sinusoid(val_episodes=4, test_episodes=4, eval_queries=5)
    check_meta_algorithm(FineTune, sinusoid, MLP, {"hidden": 8}, adapter="lora",
                         lora_targets="linear", finetune="all", finetune_steps=3,
                         batch_tasks=2)


def test_a_pair_that_cannot_work_is_refused_before_anything_is_stored(tmp_path):
    """LoRA on attention layers that the source's network lacks: one line naming the pair
    and the fix, before a study exists; with a source that has them, only that pair is
    logged."""
    import autometa
    from autometa.engine.prepare import prepare

    host = autometa.create_host()
    small = {"val_episodes": 2, "test_episodes": 2}
    lora = {"maml": {"adapter": "lora", "lora_targets": "attention"}}
    with pytest.raises(ConfigError, match=r"^algorithm 'maml' cannot adapt source model "
                                          r"'conv4' here: maml\.lora_targets 'attention' "
                                          r"matches no layer .*; set maml\.lora_targets=linear"):
        prepare(autometa.SearchConfig(task="digits", task_params=small, sources=["conv4"],
                                      algorithms=["maml"], algorithm_params=lora,
                                      storage=f"sqlite:///{tmp_path / 'a.db'}"), host)
    assert not (tmp_path / "a.db").exists()
    # "linear" among the searched choices: the pair can work, nothing refused.
    either = {"maml": {"adapter": "lora"}}
    prepared = prepare(autometa.SearchConfig(task="digits", task_params=small,
                                             sources=["conv4"], algorithms=["maml"],
                                             algorithm_params=either), host)
    assert list(prepared.algorithms) == ["maml"]
