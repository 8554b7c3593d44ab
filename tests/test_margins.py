"""Single-process tests of the margin types and sub-centers (classifier/margins.py): float64
head against the independent float64 reference (tests/classifier_ref.py) over two training
forwards (running statistics included), config rules, the Triton refusal, margin health,
the exporter's gauges, the checkpoint layout (ClassifierState) and an exact resume through the
engine's checkpointer."""

from __future__ import annotations

import math

import pytest
import torch

import dist_cosface.classifier.head as head_module
from dist_cosface.classifier import ClassifierConfig, build_classifier_optimizer
from dist_cosface.classifier.health import MarginHealth
from dist_cosface.classifier.margins import MagFaceParams
from dist_cosface.classifier.state import ClassifierState
from dist_cosface.config import load_config
from dist_cosface.configtools import ConfigError, from_mapping
from dist_cosface.distributed import DistContext
from dist_cosface.engine import train
from dist_cosface.metrics import MetricsConfig, PrometheusMetrics
from tests.classifier_ref import ALL_MARGINS, make_head, reference_head
from tests.prom_scrape import scrape, value
from tests.tiny import tiny_config

C, D, N = 13, 5, 10
# parameters that make every branch happen on small random batches: AdaFace's and
# CurricularFace's statistics move fast (momentum 0.5 and 0.9), AdaFace's margin scaler clips, the
# MagFace norm range cuts through the batch's norms, combined uses m1 != 1
SECTIONS = {
    "combined": {"combined": {"m1": 1.5, "m2": 0.3, "m3": 0.1}},
    "curricularface": {"curricularface": {"momentum": 0.5}},
    "adaface": {"adaface": {"h": 1.0, "momentum": 0.9}},
    "magface": {"magface": {"l_a": 2.0, "u_a": 6.0, "l_m": 0.3, "u_m": 0.7, "lambda_g": 2.0}},
}


def config(margin_type: str, **fields) -> ClassifierConfig:
    data = dict(num_classes=C, margin_type=margin_type, scale=8.0, margin=0.4)
    data.update(SECTIONS.get(margin_type, {}))
    data.update(fields)
    return from_mapping(ClassifierConfig, data)


def fp64_head(cfg: ClassifierConfig, weight: torch.Tensor):
    head = make_head(
        C, D, weight.float(), **{k: v for k, v in vars(cfg).items() if k != "num_classes"}
    )
    head = head.double()
    with torch.no_grad():
        head.weight.copy_(weight)
    return head


def batch(gen: torch.Generator, weight: torch.Tensor, k: int):
    """Raw embeddings with norms from 0.5 to 8 (MagFace's clip on both sides), one sample at
    the opposite pole of its class (the fallback branches), one close to its class (AdaFace's
    clip of theta + g_angle at eps)."""
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    x *= 0.5 + 7.5 * torch.rand(N, 1, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, C, (N,), generator=gen)
    x[0] = -3.0 * weight[labels[0] * k] + 0.45 * x[0] / x[0].norm() * weight[labels[0] * k].norm()
    x[1] = 9.0 * weight[labels[1] * k] + 0.5 * x[1] / x[1].norm()  # theta ~ 0.1 (not 0:
    # ArcFace's derivative is unbounded at theta = 0)
    return x, labels


@pytest.mark.parametrize("margin_type", ALL_MARGINS)
@pytest.mark.parametrize("subcenters", [1, 3])
@pytest.mark.parametrize("chunk_size,materialize", [(4, False), (None, True)])
def test_float64_head_matches_reference_over_two_training_steps(
    margin_type, subcenters, chunk_size, materialize
):
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(C * subcenters, D, generator=gen, dtype=torch.float64)
    cfg = config(margin_type, subcenters=subcenters, chunk_size=chunk_size, materialize=materialize)
    head, ref = fp64_head(cfg, weight), reference_head(cfg)
    for _ in range(2):  # the second forward uses the first one's running statistics
        x, labels = batch(gen, weight, subcenters)
        xl = x.clone().requires_grad_()
        head.weight.grad = None
        loss = head(xl, labels)
        loss.backward()
        ref_loss, dx, dw = ref.loss_and_grads(x, weight, labels)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(xl.grad, dx, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(head.weight.grad, dw, rtol=1e-9, atol=1e-12)
        stats = {k: float(v) for k, v in head.margin_state.stats.items()}
        assert stats == pytest.approx(ref.stats, rel=1e-12, abs=1e-15)
    head.eval()  # evaluation forwards use the statistics without updating them
    head(x, labels)
    assert {k: float(v) for k, v in head.margin_state.stats.items()} == stats
    if margin_type == "curricularface":
        assert stats["t"] != 0.0
    if margin_type == "adaface":
        assert stats["norm_mean"] < 15.0  # moved from the reference's initial 20


@pytest.mark.parametrize("margin_type", ["arcface", "combined"])
def test_straight_through_gradient_is_arcface_torch_no_grad_margin(margin_type):
    gen = torch.Generator().manual_seed(8)
    weight = torch.randn(C, D, generator=gen, dtype=torch.float64)
    x, labels = batch(gen, weight, 1)
    grads = {}
    for mode in ("exact", "straight_through"):
        cfg = config(margin_type, arcface_gradient=mode, chunk_size=4)
        head = fp64_head(cfg, weight)
        xl = x.clone().requires_grad_()
        loss = head(xl, labels)
        loss.backward()
        ref_loss, dx, dw = reference_head(cfg).loss_and_grads(x, weight, labels)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(xl.grad, dx, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(head.weight.grad, dw, rtol=1e-9, atol=1e-12)
        grads[mode] = (loss.detach(), xl.grad)
    # same loss value, different gradient
    assert grads["exact"][0] == grads["straight_through"][0]
    assert (grads["exact"][1] - grads["straight_through"][1]).abs().max() > 1e-3


def test_combined_reproduces_arcface_and_cosface():
    gen = torch.Generator().manual_seed(9)
    weight = torch.randn(C, D, generator=gen, dtype=torch.float64)
    x, labels = batch(gen, weight, 1)
    x[0] = weight[labels[0]] + 0.3 * x[0]  # keep every theta + m below pi (arcface's fallback
    # differs from combined's continuous one only there)
    for plain, combo in (
        (dict(margin_type="arcface", margin=0.5), dict(m1=1.0, m2=0.5, m3=0.0)),
        (dict(margin_type="cosface", margin=0.35), dict(m1=1.0, m2=0.0, m3=0.35)),
    ):
        a = fp64_head(config(**plain), weight)(x, labels)
        b = fp64_head(config("combined", combined=combo), weight)(x, labels)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_margin_health_uses_each_margins_effective_target():
    gen = torch.Generator().manual_seed(10)
    k = 3
    weight = torch.randn(C * k, D, generator=gen, dtype=torch.float64)
    for margin_type in ("adaface", "curricularface", "magface", "combined"):
        cfg = config(margin_type, subcenters=k, chunk_size=4)
        head, ref = fp64_head(cfg, weight), reference_head(cfg)
        x, labels = batch(gen, weight, k)
        head.set_epoch(0)
        head.begin_step(0, collect_health=True)
        head(x, labels).backward()
        ref.loss_and_grads(x, weight, labels)
        health = head.step_report().health
        floats = health.to_floats()
        # the reference's target values f(c) after the step (statistics updated) and its
        # class cosines: the hardest negative is the largest non-target one
        logits, y, _ = ref.logits(x.clone().requires_grad_(), weight, labels, None, train=False)
        f = (logits[torch.arange(N), y] / cfg.scale).detach()
        xn = x / x.norm(dim=1, keepdim=True)
        wn = weight / weight.norm(dim=1, keepdim=True)
        per_center = (xn @ wn.T).view(N, C, k)
        cos, nearest = per_center.max(dim=2)
        c = cos[torch.arange(N), labels]
        neg = cos.scatter(1, labels[:, None], -math.inf).amax(dim=1)
        assert floats["margin_violation_rate"] == pytest.approx((neg > f).double().mean().item())
        assert floats["effective_margin_mean"] == pytest.approx((c - f).mean().item())
        assert floats["feature_norm_mean"] == pytest.approx(x.norm(dim=1).mean().item())
        hits = torch.zeros(C, k)
        hits.index_put_((labels, nearest[torch.arange(N), labels]), torch.ones(N), accumulate=True)
        used = hits.sum(1) > 0
        share = (hits.amax(1)[used] / hits.sum(1)[used]).mean().item()
        assert floats["subcenter_dominant_share"] == pytest.approx(share)
        for name, stat in ref.stats.items():
            assert floats[f"running_stat_{name}"] == pytest.approx(stat)


def test_exporter_serves_the_new_margin_gauges():
    m = PrometheusMetrics(MetricsConfig(port=0, node="n1"), DistContext(), {})
    try:
        m.on_margin_health(
            {
                "effective_margin_mean": 0.3,
                "feature_norm_mean": 21.5,
                "subcenter_dominant_share": 0.75,
                "running_stat_t": 0.125,
                "running_stat_norm_std": 4.0,
            }
        )
        got = scrape(m.port)
        assert value(got, "dist_cosface_effective_margin_mean") == 0.3
        assert value(got, "dist_cosface_feature_norm_mean") == 21.5
        assert value(got, "dist_cosface_subcenter_dominant_share") == 0.75
        assert value(got, "dist_cosface_margin_running_stat", stat="t") == 0.125
        assert value(got, "dist_cosface_margin_running_stat", stat="norm_std") == 4.0
    finally:
        m.close()


def test_health_of_plain_margins_has_no_running_fields():
    head = make_head(C, D, torch.randn(C, D), margin_type="cosface", scale=8.0)
    head.begin_step(0, collect_health=True)
    head(torch.randn(4, D), torch.tensor([0, 1, 2, 3]))
    floats = head.step_report().health.to_floats()
    assert floats["effective_margin_mean"] == pytest.approx(0.35)
    assert not any(k.startswith(("running_stat_", "subcenter")) for k in floats)
    assert isinstance(MarginHealth.to_floats, object)


def test_checkpoint_layout_keeps_a_class_s_subcenters_together_and_the_statistics():
    gen = torch.Generator().manual_seed(11)
    k = 3
    weight = torch.randn(C * k, D, generator=gen, dtype=torch.float64)
    cfg = config("curricularface", subcenters=k)
    head = fp64_head(cfg, weight).float()
    opt = build_classifier_optimizer(head, "adamw", lr=0.1)
    x, labels = batch(gen, weight, k)
    head(x.float(), labels).backward()
    opt.step()
    state = ClassifierState(head, opt, None).state_dict()
    assert state["weight"].shape == (C, k, D)
    assert state["optim"]["exp_avg"].shape == (C, k, D)
    assert state["optim"]["row_step"].shape == (C, k)
    torch.testing.assert_close(state["weight"][5], head.weight.detach()[5 * k : 6 * k])
    assert float(state["margin_stats"]["t"]) == float(head.margin_state.stats["t"]) != 0.0
    fresh = make_head(
        C, D, torch.zeros(C * k, D), **{k_: v for k_, v in vars(cfg).items() if k_ != "num_classes"}
    )
    fresh_opt = build_classifier_optimizer(fresh, "adamw", lr=0.1)
    ClassifierState(fresh, fresh_opt, None).load_state_dict(state)
    torch.testing.assert_close(fresh.weight, head.weight, rtol=0, atol=0)
    torch.testing.assert_close(fresh_opt.row_state()["exp_avg"], opt.row_state()["exp_avg"])
    assert fresh.margin_state.stats["t"] == head.margin_state.stats["t"]
    del state["margin_stats"]
    with pytest.raises(
        ValueError, match=r"checkpoint has \[\], margin_type=curricularface keeps \['t'\]"
    ):
        ClassifierState(fresh, fresh_opt, None).load_state_dict(state)


def test_subcenter_rows_of_unsampled_classes_stay_untouched():
    cfg = config("cosface", subcenters=3, sample_rate=0.3, chunk_size=2)
    head = make_head(
        C, D, torch.randn(C * 3, D), **{k: v for k, v in vars(cfg).items() if k != "num_classes"}
    )
    head.begin_step(0)
    head(torch.randn(4, D), torch.tensor([0, 5, 5, 9])).backward()
    classes = head.last_sampled_rows
    assert {0, 5, 9} <= set(classes.tolist()) and len(classes) == max(math.ceil(0.3 * C), 3)
    used = torch.zeros(C, dtype=torch.bool)
    used[classes] = True
    grad_norm = head.weight.grad.view(C, 3, D).norm(dim=2)
    assert (grad_norm[~used] == 0).all() and (grad_norm[used].amax(dim=1) > 0).all()
    touched = head.take_touched_rows()
    assert torch.equal(touched, (used[:, None].expand(C, 3).reshape(-1)).nonzero().squeeze(1))


# ---- config rules -------------------------------------------------------------------------

_BAD = [
    (
        ["classifier.margin_type=combined", "classifier.combined.m1=0.5"],
        "classifier.combined.m1 must be in [1, 4]",
    ),
    (
        ["classifier.margin_type=combined", "classifier.combined.m2=3.5"],
        "classifier.combined.m2 must be in [0, 3.14159)",
    ),
    (
        ["classifier.margin_type=combined", "classifier.combined.m3=1.5"],
        "combined.m3 must be <= C/(C-1)",
    ),
    (
        ["classifier.margin_type=curricularface", "classifier.margin=3.2"],
        "classifier.margin must be an angle in [0, pi) for curricularface",
    ),
    (
        ["classifier.curricularface.momentum=0"],
        "classifier.curricularface.momentum must be in (0, 1]",
    ),
    (["classifier.adaface.h=0"], "classifier.adaface.h must be in (0, 1]"),
    (["classifier.adaface.momentum=1.5"], "classifier.adaface.momentum must be in (0, 1]"),
    (
        ["classifier.margin_type=adaface", "classifier.margin=1.2"],
        "classifier.margin must be in [0, 1] for adaface",
    ),
    (["classifier.magface.u_a=5"], "classifier.magface.u_a must be > l_a = 10.0"),
    (["classifier.magface.l_m=0.9"], "classifier.magface.u_m must be >= l_m = 0.9"),
    (["classifier.magface.lambda_g=-1"], "classifier.magface.lambda_g must be in [0, 1e+06]"),
    (["classifier.subcenters=0"], "classifier.subcenters must be in [1, 64]"),
    (
        ["classifier.arcface_gradient=straight_through"],
        "classifier.arcface_gradient straight_through applies to ['arcface', 'combined'] "
        "only, not to margin_type=cosface",
    ),
    (
        ["classifier.arcface_gradient=sloppy"],
        "'sloppy' is not one of ['exact', 'straight_through']",
    ),
    (["classifier.magface.foo=1"], "unknown config key(s) ['classifier.magface.foo']"),
    (
        ["classifier.margin_type=adaface", "classifier.feature_norm=false"],
        "feature_norm=False applies to ['nsl', 'cosface', 'arcface'], not to margin_type=adaface",
    ),
    (
        ["classifier.subcenters=2", "classifier.feature_norm=false"],
        "feature_norm=False is implemented for subcenters=1",
    ),
]


@pytest.mark.parametrize("overrides, message", _BAD)
def test_margin_keys_are_typed_and_range_checked(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["classifier.num_classes=100", *overrides])
    assert message in str(err.value)


@pytest.mark.parametrize(
    "fields, named",
    [
        (dict(margin_type="combined"), "margin_type=combined"),
        (dict(margin_type="curricularface"), "margin_type=curricularface"),
        (dict(margin_type="adaface"), "margin_type=adaface"),
        (dict(margin_type="magface"), "margin_type=magface"),
        (dict(margin_type="cosface", subcenters=3), "subcenters=3"),
        (dict(margin_type="arcface", arcface_gradient="straight_through"), "arcface_gradient"),
    ],
)
def test_triton_kernel_refuses_what_it_lacks_at_config_time(fields, named):
    with pytest.raises(ValueError, match=f"kernel 'triton' does not implement {named}"):
        ClassifierConfig(num_classes=100, kernel="triton", **fields)
    assert not ClassifierConfig(num_classes=100, kernel="auto", **fields).triton_supported


def test_auto_kernel_runs_unsupported_margins_on_torch(monkeypatch):
    """With kernel auto on a machine where Triton would run, the new margins still take the
    torch kernels (the Triton loss is made to fail loudly if it is reached)."""

    def refuse(*args):
        raise AssertionError("the Triton loss was called")

    monkeypatch.setattr(head_module, "use_triton", lambda *args: True)
    monkeypatch.setattr(head_module.TritonMarginLoss, "apply", refuse)
    x, labels = torch.randn(4, D), torch.tensor([0, 1, 2, 3])
    make_head(C, D, torch.randn(C, D), margin_type="curricularface", kernel="auto")(x, labels)
    make_head(C, D, torch.randn(3 * C, D), subcenters=3, kernel="auto")(x, labels)
    with pytest.raises(AssertionError, match="Triton loss was called"):
        make_head(C, D, torch.randn(C, D), margin_type="cosface", kernel="auto")(x, labels)


# ---- the experiment runner's new knobs ----------------------------------------------------


def test_label_noise_flips_the_asked_share_to_other_identities():
    from dist_cosface.experiments.runner import flip_labels

    labels = torch.arange(200) % 10
    noisy = flip_labels(labels, 10, 0.2, seed=3)
    changed = noisy != labels
    assert int(changed.sum()) == 40 and ((noisy >= 0) & (noisy < 10)).all()
    assert torch.equal(noisy, flip_labels(labels, 10, 0.2, seed=3))  # same flips per seed
    assert not torch.equal(noisy, flip_labels(labels, 10, 0.2, seed=4))
    assert flip_labels(labels, 10, 0.0, seed=3) is labels


def test_experiment_trains_new_margins_with_subcenters_and_noise():
    from dist_cosface.experiments import ExperimentConfig, FaceSet, train_model

    gen = torch.Generator().manual_seed(0)
    faces = FaceSet(
        torch.randint(0, 256, (24, 1, 16, 16), generator=gen, dtype=torch.uint8),
        torch.arange(24) % 4,
        ["a", "b", "c", "d"],
    )
    cfg = ExperimentConfig(
        dataset="orl", image_size=16, width=4, embedding_size=8, epochs=2, batch_size=8,
        margin_type="magface", subcenters=3, label_noise=0.2,
        magface=MagFaceParams(l_a=1.0, u_a=11.0, lambda_g=3.5),
    )  # fmt: skip
    _, head, summary = train_model(cfg, faces)
    assert head.subcenters == 3 and head.spec.magface.u_a == 11.0
    assert math.isfinite(summary["final_loss"]) and summary["steps"] == 6


# ---- through the engine's checkpointer ------------------------------------------------------


def test_engine_resume_of_curricularface_with_subcenters_is_exact(tmp_path):
    """A run interrupted after step 1 and resumed from its checkpoint (rows as [C, K, D], the
    running t) takes the same step 2 as a run that was never interrupted (a t left at its
    initial value changes the reweighted negatives, hence the loss)."""
    overrides = (
        "classifier.margin_type=curricularface",
        "classifier.subcenters=2",
        "classifier.curricularface.momentum=0.5",
        "optim.name=sgd",
        "train.total_steps=2",
    )
    straight = train(tiny_config(tmp_path / "straight", *overrides), DistContext())
    interrupted = tmp_path / "interrupted"
    train(tiny_config(interrupted, *overrides, "train.total_steps=1"), DistContext())
    resumed = train(tiny_config(interrupted, *overrides), DistContext())
    assert resumed.resumed_from.endswith("step_1") and resumed.step == 2
    assert resumed.loss == straight.loss
