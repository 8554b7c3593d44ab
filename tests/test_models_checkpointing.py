"""``model.activation_checkpointing``: the same training, bit for bit, with less kept.

Plain and checkpointed copies of a backbone start from the same weights and the same RNG
state and take SGD steps on the same batches; losses, every gradient, the weights and every
BatchNorm running statistic and batch counter must be *equal* (torch.equal), not close: the
recomputation runs the same kernels on the same inputs. Two guards show the comparison can
fail: without the frozen-statistics context the BN running statistics are updated twice,
and without RNG preservation the recomputed drop-path masks differ.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from torch import nn

import dist_cosface.models.checkpointing as ckpt_module
from dist_cosface.models import ModelConfig, build_backbone
from dist_cosface.models.iresnet import IBasicBlock
from dist_cosface.models.vit import TransformerBlock

IRESNET = ModelConfig(name="iresnet18", input_size=32, embedding_size=16, dropout=0.2)
# drop path 0.5 and a quarter of the tokens masked: the random parts are well exercised
VIT = ModelConfig(
    name="vit_t", input_size=36, embedding_size=16, dropout=0.2, drop_path_rate=0.5, mask_ratio=0.25
)


def train_record(model: nn.Module, steps: int = 2, seed: int = 0) -> list[dict]:
    """Per step: loss, output, gradients, weights and buffers after an SGD step."""
    torch.manual_seed(seed)
    data = [(torch.randn(4, 3, model.input_size, model.input_size), torch.randn(4, 16))]
    data += [(torch.randn_like(data[0][0]), torch.randn(4, 16)) for _ in range(steps - 1)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    record = []
    torch.manual_seed(seed + 1)  # the same stream of dropout / drop-path / mask draws
    model.train()
    for images, target in data:
        optimizer.zero_grad()
        out = model(images)
        loss = ((out - target) ** 2).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        record.append(
            {
                "loss": loss.detach(),
                "out": out.detach(),
                "grads": grads,
                "state": {k: v.clone() for k, v in model.state_dict().items()},
            }
        )
    return record


def plain_and_checkpointed(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    plain = build_backbone(cfg)
    checkpointed = build_backbone(dataclasses.replace(cfg, activation_checkpointing=True))
    checkpointed.load_state_dict(plain.state_dict())
    for model in (plain, checkpointed):
        model.input_size = cfg.input_size
    return plain, checkpointed


def differences(a: list[dict], b: list[dict]) -> list[str]:
    """Names of everything that is not bit-for-bit equal between two records."""
    bad = []
    for step, (x, y) in enumerate(zip(a, b)):
        for key in ("loss", "out"):
            if not torch.equal(x[key], y[key]):
                bad.append(f"step {step} {key}")
        for group in ("grads", "state"):
            bad += [
                f"step {step} {group} {n}"
                for n in x[group]
                if not torch.equal(x[group][n], y[group][n])
            ]
    return bad


def count_block_forwards(model: nn.Module, block_type: type) -> list[int]:
    calls = [0]

    def hook(module, args):
        calls[0] += 1

    for m in model.modules():
        if isinstance(m, block_type):
            m.register_forward_pre_hook(hook)
    return calls


@pytest.mark.parametrize("cfg", [IRESNET, VIT], ids=["iresnet18", "vit_t"])
def test_checkpointed_training_equals_plain_bit_for_bit(cfg, one_thread):
    plain, checkpointed = plain_and_checkpointed(cfg)
    block_type = (
        type(next(iter(plain.stages[0]))) if cfg.name.startswith("iresnet") else TransformerBlock
    )
    plain_calls = count_block_forwards(plain, block_type)
    ckpt_calls = count_block_forwards(checkpointed, block_type)
    reference, result = train_record(plain), train_record(checkpointed)
    assert not differences(reference, result)
    # checkpointing really ran: every block ran again in each backward pass
    assert ckpt_calls[0] == 2 * plain_calls[0] > 0
    # and the BN statistics moved (the comparison of them is not vacuous)
    bn = [k for k in reference[0]["state"] if k.endswith("running_mean")]
    assert bn and not torch.equal(reference[0]["state"][bn[0]], reference[1]["state"][bn[0]])


def test_eval_and_no_grad_do_not_recompute(one_thread):
    plain, checkpointed = plain_and_checkpointed(IRESNET)
    calls = count_block_forwards(checkpointed, IBasicBlock)
    x = torch.randn(2, 3, 32, 32)
    outputs = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # the head's dropout feeds its BatchNorm's statistics
        with torch.no_grad():
            model.train()(x)
        outputs.append(model.eval()(x))
        outputs[-1].sum().backward()
    assert calls[0] == 2 * 8  # two forwards of the 8 blocks, no recomputation
    assert torch.equal(*outputs)


def test_guard_without_frozen_statistics_the_running_stats_differ(one_thread, monkeypatch):
    plain, checkpointed = plain_and_checkpointed(IRESNET)
    naive = lambda block: (ckpt_module.contextlib.nullcontext(),) * 2  # noqa: E731
    monkeypatch.setattr(ckpt_module, "_recompute_contexts", naive)
    bad = differences(train_record(plain, steps=1), train_record(checkpointed, steps=1))
    assert bad and all(".running_" in n or "num_batches_tracked" in n for n in bad)


def test_guard_without_rng_preservation_the_gradients_differ(one_thread, monkeypatch):
    plain, checkpointed = plain_and_checkpointed(VIT)
    unpreserved = functools.partial(ckpt_module.checkpoint, preserve_rng_state=False)
    monkeypatch.setattr(ckpt_module, "checkpoint", unpreserved)
    bad = differences(train_record(plain, steps=1), train_record(checkpointed, steps=1))
    assert any("grads blocks." in n for n in bad)
