"""ViT family and iResNet-200: published sizes, the ViT's parts against references, config
checks, ONNX parity. Large models are built on the ``meta`` device (shapes, no memory)."""

from __future__ import annotations

import math
import typing

import pytest
import torch
from torch import nn

from dist_cosface.configtools import ConfigError, from_mapping
from dist_cosface.models import ModelConfig, build_backbone, count_macs, count_parameters
from dist_cosface.models.iresnet import DEPTH_LAYERS
from dist_cosface.models.vit import DropPath, SelfAttention
from tests.models_common import calibrate_batchnorm

# insightface arcface_torch README, "ViT For Face Recognition" table, FLOPs column (G), for
# 112x112 inputs and 512-d embeddings. arcface_torch's flops.py reports ptflops'
# multiply-accumulates plus each ViT block's two attention matmuls (its `extra_gflops`,
# 2 * tokens^2 * width), so these are GMACs.
PUBLISHED_GMACS = {
    "iresnet18": 2.6,
    "iresnet50": 6.3,
    "iresnet100": 12.1,
    "iresnet200": 23.5,
    "vit_t": 1.5,
    "vit_s": 5.7,
    "vit_b": 11.4,
    "vit_l": 25.3,
}
# arcface_torch's backbones/__init__.py get_model(): width, depth (8 heads, 9x9 patches,
# MLP ratio 4 for all); vit_l is its "vit_l_dp005_mask_005".
ARCFACE_VIT = {"vit_t": (256, 12), "vit_s": (512, 12), "vit_b": (512, 24), "vit_l": (768, 24)}
ARCFACE_VIT_RATES = {"vit_t": 0.1, "vit_s": 0.1, "vit_b": 0.1, "vit_l": 0.05}  # drop path = mask


def meta_backbone(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return build_backbone(ModelConfig(name=name, **kwargs))


def vit_parameters(width: int, depth: int, tokens: int, embedding: int, mask: bool) -> int:
    """Closed form from the architecture: patch conv (+bias), position embedding, optional
    mask token, blocks (q/k/v 3d^2 without bias, projection d^2 + d, MLP 8d^2 + 5d, two
    LayerNorms 4d), final LayerNorm, head FC (tokens*d -> d, no bias) + BN + FC + BN."""
    d = width
    block = 12 * d * d + 10 * d
    stem = 3 * 9 * 9 * d + d + tokens * d + (d if mask else 0)
    head = tokens * d * d + 2 * d + d * embedding + 2 * embedding
    return stem + depth * block + 2 * d + head


def iresnet_parameters(layers: tuple[int, ...], embedding: int, final: int = 7) -> int:
    """Closed form: stem conv + BN + PReLU; per unit BN, 3x3 conv, BN, PReLU, 3x3 conv, BN
    (+ 1x1 conv + BN on each stage's first, strided, unit); head BN, FC (+bias), BN1d."""
    total = 27 * 64 + 2 * 64 + 64
    cin = 64
    for blocks, c in zip(layers, (64, 128, 256, 512)):
        for i in range(blocks):
            total += 2 * cin + 9 * cin * c + 2 * c + c + 9 * c * c + 2 * c
            total += cin * c + 2 * c if i == 0 else 0
            cin = c
    return total + 2 * 512 + 512 * final * final * embedding + embedding + 2 * embedding


def test_macs_match_arcface_torch_published_figures():
    # Tolerance: the published figures are rounded to 0.1 G (+-0.05 G), and ptflops also
    # counts normalisations, activations and bias additions, which torch's flop counter does
    # not (< 0.5% here). A wrong width, depth, MLP ratio or patch size is off by >= 10%;
    # dropping ViT-L's attention matmuls (0.76 G) is off by 3%.
    counted = {name: count_macs(meta_backbone(name), 112) for name in PUBLISHED_GMACS}
    for name, published in PUBLISHED_GMACS.items():
        tolerance = 0.05 + 0.005 * published
        assert abs(counted[name] / 1e9 - published) <= tolerance, (name, counted[name])
    # the attention matmuls are in the count: 2 * 144^2 * 768 per block, 24 blocks
    attention = 24 * 2 * 144 * 144 * 768
    assert counted["vit_l"] - attention > (25.3 - 0.05 - 0.77) * 1e9 - 0.13e9


def test_parameter_counts_match_the_closed_form():
    for name, (width, depth) in ARCFACE_VIT.items():
        expected = vit_parameters(width, depth, 144, 512, mask=True)
        assert count_parameters(meta_backbone(name)) == expected, name
    # no mask token when masking is off (an unused parameter would trip DDP)
    no_mask = meta_backbone("vit_l", mask_ratio=0.0)
    assert count_parameters(no_mask) == vit_parameters(768, 24, 144, 512, mask=False)
    for depth in (18, 100, 200):
        model = meta_backbone(f"iresnet{depth}")
        assert count_parameters(model) == iresnet_parameters(DEPTH_LAYERS[depth], 512), depth
    assert DEPTH_LAYERS[200] == (6, 26, 60, 6)  # arcface_torch's iresnet200
    # the figures in docs/training.md
    assert count_parameters(meta_backbone("vit_l")) == 255_684_352
    assert count_parameters(meta_backbone("iresnet200")) == 118_833_920


def test_vit_shapes_and_rates_follow_arcface_torch():
    for name, (width, depth) in ARCFACE_VIT.items():
        model = meta_backbone(name)
        rate = ARCFACE_VIT_RATES[name]
        assert len(model.blocks) == depth and model.num_tokens == 144
        conv = model.patch_embed
        assert (conv.kernel_size, conv.stride, conv.out_channels) == ((9, 9), (9, 9), width)
        block = model.blocks[0]
        assert block.attn.heads == 8 and block.mlp[0].out_features == 4 * width
        assert isinstance(block.mlp[1], nn.ReLU6)
        assert block.attn.qkv.bias is None and block.attn.proj.bias is not None
        rates = [b.drop_path.rate for b in model.blocks]
        assert rates[0] == 0.0 and math.isclose(rates[-1], rate)
        assert all(math.isclose(b - a, rate / (depth - 1)) for a, b in zip(rates, rates[1:]))
        assert model.kept_tokens == int(144 * (1 - rate))  # 129 at 0.1, 136 at 0.05
        head = model.feature
        assert head[0].in_features == 144 * width and head[0].bias is None
        assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d] * 2
        assert head[1].eps == head[3].eps == 2e-5
    overridden = meta_backbone("vit_b", drop_path_rate=0.0, mask_ratio=0.0)
    assert overridden.mask_token is None and overridden.kept_tokens == 144
    assert all(b.drop_path.rate == 0.0 for b in overridden.blocks)


def test_attention_matches_a_float64_reference():
    torch.manual_seed(0)
    attention = SelfAttention(width=32, heads=4)
    nn.init.normal_(attention.proj.bias)
    x = torch.randn(3, 10, 32)
    got = attention(x)
    # reference: per head softmax(q k^T / sqrt(d_head)) v, heads concatenated, then proj
    w = attention.qkv.weight.double()
    q, k, v = (x.double() @ w.T).split(32, dim=-1)
    heads = [
        torch.softmax(q[..., h : h + 8] @ k[..., h : h + 8].transpose(1, 2) / 8**0.5, -1)
        @ v[..., h : h + 8]
        for h in range(0, 32, 8)
    ]
    proj = attention.proj
    expected = torch.cat(heads, -1) @ proj.weight.double().T + proj.bias.double()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
    torch.manual_seed(0)
    drop = DropPath(0.3).train()
    x = torch.ones(20000, 4, 3)
    out = drop(x)
    per_sample = out.flatten(1)
    dropped = (per_sample == 0).all(1)
    assert ((per_sample == 0) == dropped[:, None]).all()  # all of a sample or nothing
    assert abs(dropped.float().mean().item() - 0.3) < 0.015  # 4.6 sigma at n = 20,000
    assert torch.allclose(per_sample[~dropped], torch.full_like(per_sample[~dropped], 1 / 0.7))
    assert abs(out.mean().item() - 1.0) < 0.035  # unbiased
    assert torch.equal(drop.eval()(x), x)


def test_token_masking_runs_blocks_on_kept_tokens_and_fills_the_rest():
    torch.manual_seed(0)
    cfg = ModelConfig(name="vit_t", input_size=36, embedding_size=32, mask_ratio=0.25)
    model = build_backbone(cfg)  # 36 px: a 4x4 grid, 12 of 16 tokens kept
    seen, head_inputs = [], []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    model.feature.register_forward_pre_hook(lambda m, args: head_inputs.append(args[0]))
    model.train()(torch.randn(8, 3, 36, 36))
    assert seen[-1] == (8, 12, 256)
    tokens = head_inputs[-1].view(8, 16, 256)
    is_mask = (tokens == model.mask_token.detach().view(1, 1, 256)).all(-1)
    assert is_mask.sum(1).tolist() == [4] * 8
    assert len({tuple(row.tolist()) for row in is_mask}) > 1  # a different subset per sample
    model.eval()(torch.randn(2, 3, 36, 36))
    assert seen[-1] == (2, 16, 256)  # eval sees every token


def test_vit_eval_is_deterministic_batch_independent_and_sized_for_its_input():
    torch.manual_seed(0)
    model = build_backbone(ModelConfig(name="vit_t", input_size=36, dropout=0.2))
    x = torch.randn(4, 3, 36, 36)
    calibrate_batchnorm(model, x)
    with torch.no_grad():
        a, b, single = model(x), model(x), model(x[1:2])
    assert a.shape == (4, 512) and a.abs().mean() > 0.1
    assert torch.equal(a, b)
    torch.testing.assert_close(single, a[1:2], rtol=1e-3, atol=2e-4)
    with pytest.raises(RuntimeError):  # another size means another token count
        model(torch.randn(1, 3, 45, 45))


def test_vit_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = build_backbone(ModelConfig(name="vit_t", input_size=27, embedding_size=16)).train()
    out = model(torch.randn(4, 3, 27, 27))
    (out * torch.randn_like(out)).sum().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not dead  # the mask token included


def test_every_model_name_builds():
    names = set(typing.get_args(typing.get_type_hints(ModelConfig)["name"]))
    assert {"iresnet200", "vit_t", "vit_s", "vit_b", "vit_l"} <= names
    for name in names:  # (the MACs test runs the forward of most of them)
        assert isinstance(meta_backbone(name), nn.Module), name


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"name": "vit_h"}, "model.name: 'vit_h' is not one of"),
        ({"name": "iresnet50", "drop_path_rate": 0.1}, "model.drop_path_rate applies to the vit"),
        ({"name": "mobilefacenet", "mask_ratio": 0.1}, "model.mask_ratio applies to the vit"),
        ({"name": "vit_b", "drop_path_rate": 1.0}, r"model.drop_path_rate must be in \[0, 1\)"),
        ({"name": "vit_b", "mask_ratio": -0.1}, r"model.mask_ratio must be in \[0, 1\)"),
        ({"name": "vit_b", "input_size": 17}, "model.mask_ratio 0.1 keeps no token of the 1"),
        ({"activation_checkpointing": "yes"}, "model.activation_checkpointing: expected true"),
        (
            {"name": "mobilefacenet", "activation_checkpointing": True},
            "model.activation_checkpointing is supported for the iresnet",
        ),
    ],
)
def test_bad_model_keys_are_refused_at_config_time(overrides, message):
    with pytest.raises(ConfigError, match=message):
        from_mapping(ModelConfig, overrides, "model")


def test_good_model_keys_load():
    cfg = from_mapping(
        ModelConfig,
        {"name": "vit_b", "input_size": 17, "mask_ratio": 0.0, "activation_checkpointing": True},
        "model",
    )
    assert cfg.vit_rates() == (0.1, 0.0)
    with pytest.raises(TypeError, match="activation_checkpointing must be true or false"):
        ModelConfig(name="iresnet18", activation_checkpointing=1).validate()


def test_vit_onnx_export_parity(tmp_path):
    # vit_t at the real 112 px / 144 tokens; the larger sizes (the same ops, wider or deeper,
    # 40-80 s each) go through tools/check_backbone_export.py, figures in docs/training.md
    name = "vit_t"
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from dist_cosface.export import check_onnx, export_onnx

    torch.manual_seed(0)
    model = build_backbone(ModelConfig(name=name))  # the real 112 px, 144-token shapes
    calibrate_batchnorm(model, torch.randn(8, 3, 112, 112))
    path = export_onnx(model, tmp_path / f"{name}.onnx", 112)
    report = check_onnx(model, path, 112, batch_sizes=(1, 3))
    assert report["max_abs_output"] > 0.5  # a real signal
    assert report["passed"] and report["max_abs_diff"] < 1e-4
