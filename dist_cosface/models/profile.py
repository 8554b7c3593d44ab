"""Model size helpers: parameter counts and multiply-accumulate counts (MACs, "FLOPs")."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's flop counter knows the CUDA attention kernels and the math fallback (bmm, which
# is what runs on the meta device), not the CPU flash kernel that CPU tensors dispatch to.
_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def count_macs(model: nn.Module, input_size: int, in_channels: int = 3) -> int:
    """MACs of one image's forward pass in eval mode: torch's flop counter
    (``torch.utils.flop_counter.FlopCounterMode``) over convolutions, matrix products and
    attention, halved (it counts a multiply-accumulate as 2 FLOPs).

    Normalisation, activations, additions and softmax are not counted: they are a small
    fraction, and papers on face backbones (e.g. MobileFaceNet's 221M "MAdds") count the same
    way. Works on the ``meta`` device, so a large model's count needs no weights.
    """
    was_training = model.training
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(torch.zeros(1, in_channels, input_size, input_size, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
