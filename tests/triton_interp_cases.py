"""Triton-kernel cases run under Triton's CPU interpreter, one group per subprocess.

``python -m tests.triton_interp_cases GROUP`` with ``TRITON_INTERPRET=1`` in the
environment (tests/test_classifier_triton.py spawns it): the interpreter must be chosen
before the kernel module is imported, so these cases never run inside pytest's process.
Every case compares the head with ``kernel="triton"`` against the float64 reference of
tests/classifier_ref.py (loss, dX, dW) or against the torch path of the same head.

The ``cuda`` group is the exception: the compiled kernels on a GPU (no interpreter), the
same cases as the GPU-marked pytest test, runnable without pytest (tools/gpu_checks.sh on a
machine that lacks it).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.classifier_ref import MARGINS, make_head, reference_loss_and_grads

SCALE, MARGIN = 16.0, 0.4


def require_interpreter() -> None:
    """Fail loudly unless the kernels are (or will be) interpreted in this process."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise AssertionError("TRITON_INTERPRET=1 must be set before the kernels are imported")
    from dist_cosface.classifier import triton_kernels as tk

    kind = type(tk.stats_kernel).__name__
    if kind != "InterpretedFunction":
        raise AssertionError(f"kernels compiled as {kind}: the env came too late")


def problem(seed: int, n: int, c: int, d: int):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(c, d, generator=gen, dtype=torch.float64)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, c, (n,), generator=gen)
    x[0] = -weight[labels[0]] + 0.05 * x[0]  # theta near pi: ArcFace's fallback branch
    if n > 2:
        labels[2] = labels[1]  # duplicate targets
    return x, labels, weight


def run_head(head, x, labels, dtype=torch.float32):
    xl = x.to(dtype).clone().requires_grad_()
    loss = head(xl, labels)
    loss.backward()
    return loss.detach(), xl.grad, head.weight.grad


def check_against_reference(margin_type, n, c, d, seed=0, **kwargs):
    x, labels, weight = problem(seed, n, c, d)
    head = make_head(
        c, d, weight.float(), margin_type=margin_type, scale=SCALE, margin=MARGIN,
        kernel="triton", **kwargs,
    )  # fmt: skip
    loss, dx, dw = run_head(head, x, labels)
    classes = None if head.last_sampled_rows is None else head.last_sampled_rows.sort().values
    ref, rdx, rdw = reference_loss_and_grads(x, weight, labels, margin_type, SCALE, MARGIN, classes)
    where = f"{margin_type} N={n} C={c} D={d} {kwargs}"
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5, msg=where)
    torch.testing.assert_close(dx.double(), rdx, rtol=1e-4, atol=1e-6, msg=where)
    torch.testing.assert_close(dw.double(), rdw, rtol=1e-4, atol=1e-6, msg=where)
    return head


def group_margins() -> None:
    """Every margin type, partial tiles in N, C and D (interpreter tiles: 16 x 32 x 32)."""
    for margin_type in MARGINS:
        for n, c, d in [(3, 2, 64), (17, 33, 64), (40, 97, 20)]:
            check_against_reference(margin_type, n, c, d)


def group_shapes() -> None:
    """Wider D (512, one and several K blocks), more classes than one chunk, N=130."""
    check_against_reference("cosface", 5, 40, 512)
    check_against_reference("arcface", 9, 70, 512, chunk_size=32)
    check_against_reference("cosface", 130, 700, 64, chunk_size=256)
    check_against_reference("nsl", 33, 5000, 8, chunk_size=2048)


def group_partial_fc() -> None:
    """Sampled rows: gathered weight rows, zero gradient on unused rows."""
    for margin_type in ("cosface", "arcface"):
        head = check_against_reference(margin_type, 21, 90, 64, sample_rate=0.3, chunk_size=16)
        used = torch.zeros(90, dtype=torch.bool)
        used[head.last_sampled_rows] = True
        if not (head.weight.grad[~used] == 0).all():
            raise AssertionError("unsampled rows got a gradient")


def group_half() -> None:
    """fp16 / bf16 embeddings: close to the fp32 torch path (half matmul operands)."""
    x, labels, weight = problem(3, 24, 150, 64)
    x[:12] = weight[labels[:12]] * 5 + 0.05 * x[:12]  # target cosines ~ 1: logits ~ s = 64
    for dtype in (torch.float16, torch.bfloat16):
        out = {}
        for kernel, dt in (("torch", torch.float32), ("triton", dtype)):
            head = make_head(150, 64, weight.float(), margin_type="arcface", kernel=kernel)
            out[kernel] = run_head(head, x, labels, dt)
        (l32, gx32, gw32), (lh, gxh, gwh) = out["torch"], out["triton"]
        if not (torch.isfinite(gxh).all() and torch.isfinite(gwh).all()):
            raise AssertionError(f"{dtype}: non-finite gradients")
        torch.testing.assert_close(lh, l32, rtol=3e-2, atol=3e-2)
        if (gxh.float() - gx32).norm() > 0.05 * gx32.norm():
            raise AssertionError(f"{dtype}: dX off by {(gxh.float() - gx32).norm()}")
        if (gwh - gw32).norm() > 0.05 * gw32.norm():
            raise AssertionError(f"{dtype}: dW off by {(gwh - gw32).norm()}")


def group_row_stats() -> None:
    """Per-row target cosine and hardest-negative cosine of a forward begun with collect_health."""
    x, labels, weight = problem(5, 19, 45, 64)
    head = make_head(45, 64, weight.float(), margin_type="cosface", kernel="triton")
    run_head(head, x, labels)
    if head.last_row_stats is not None:
        raise AssertionError("row statistics without collect_health")
    head.begin_step(0, collect_health=True)
    run_head(head, x, labels)
    cos = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).T
    target = cos.gather(1, labels[:, None]).squeeze(1)
    negatives = cos.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
    stats = head.last_row_stats
    torch.testing.assert_close(stats.target_cos.double(), target, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.hardest_neg_cos.double(), negatives, rtol=1e-4, atol=1e-5)


NUM_CLASSES, DIM = 23, 64


def two_rank_case(rank, world, sample_rate):
    """One rank of tests/test_classifier_triton.py's 2-rank gloo check (run_ranks target).

    This module does not import triton, so the rank's ``TRITON_INTERPRET=1`` (set by
    run_ranks before calling this) is in place before triton's first import.
    """
    if "triton" in sys.modules:
        raise AssertionError("triton was imported before the rank's environment was set")
    require_interpreter()
    gen = torch.Generator().manual_seed(7)
    sizes = [5, 2]  # uneven local batches
    x = torch.randn(sum(sizes), DIM, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (sum(sizes),), generator=gen)
    labels[0] = labels[1] = NUM_CLASSES - 1  # owned by rank 1: rank 0 sees target -1
    weight = torch.randn(NUM_CLASSES, DIM, generator=gen, dtype=torch.float64)
    x[2] = -weight[labels[2]] + 0.05 * x[2]  # ArcFace fallback branch
    head = make_head(
        NUM_CLASSES, DIM, weight, dist.group.WORLD, margin_type="arcface", scale=8.0,
        margin=0.4, sample_rate=sample_rate, kernel="triton", chunk_size=8,
    )  # fmt: skip
    start = sum(sizes[:rank])
    xl = x[start : start + sizes[rank]].float().clone().requires_grad_()
    loss = head(xl, labels[start : start + sizes[rank]])
    loss.backward()
    rows = None
    if head.last_sampled_rows is not None:
        rows = (head.last_sampled_rows + head.class_start).tolist()
    return x, labels, weight, loss.detach(), xl.grad, head.weight.grad, head.class_start, rows


def cuda_case(dtype: torch.dtype, margin_type: str) -> None:
    """The compiled kernels on CUDA against the float64 reference, full and Partial FC rows.

    fp32 embeddings run on TF32 (allowed here, refused while PyTorch forbids TF32); partial
    tiles in N, C and D and several backward chunks (C = 3,001, chunk 1,024).
    """
    gen = torch.Generator().manual_seed(11)
    num_classes, dim, batch = 3001, 512, 130
    weight = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    x[0] = -weight[labels[0]] + 0.05 * x[0]
    matmul = torch.backends.cuda.matmul
    tf32_before = matmul.allow_tf32
    for sample_rate in (1.0, 0.3):
        head = make_head(
            num_classes, dim, weight.float(), margin_type=margin_type, scale=16.0,
            margin=MARGIN, sample_rate=sample_rate, kernel="triton", chunk_size=1024,
        ).cuda()  # fmt: skip
        xl = x.to("cuda", dtype).requires_grad_()
        if dtype == torch.float32:
            matmul.allow_tf32 = False
            try:
                head(xl, labels.cuda())
                raise AssertionError("fp32 ran on the Triton path although TF32 is forbidden")
            except ValueError as exc:
                if "TF32" not in str(exc):
                    raise
            matmul.allow_tf32 = True
        try:
            loss = head(xl, labels.cuda())
            loss.backward()
        finally:
            matmul.allow_tf32 = tf32_before
        classes = None if sample_rate == 1.0 else head.last_sampled_rows.sort().values.cpu()
        ref, dx, dw = reference_loss_and_grads(
            x, weight, labels, margin_type, 16.0, MARGIN, classes
        )
        got = (loss.double().cpu(), xl.grad.double().cpu(), head.weight.grad.double().cpu())
        where = f"{dtype} {margin_type} sample_rate={sample_rate}"
        # TF32 products (10-bit mantissa) for fp32, 16-bit operands otherwise
        loss_tol, grad_tol = (1e-3, 5e-3) if dtype == torch.float32 else (2e-2, 5e-2)
        torch.testing.assert_close(got[0], ref, rtol=loss_tol, atol=loss_tol, msg=where)
        for a, b, name in zip(got[1:], (dx, dw), ("dX", "dW")):
            if (a - b).norm() > grad_tol * b.norm():
                raise AssertionError(f"{where}: {name} off by {(a - b).norm() / b.norm():.2e}")
        if sample_rate < 1.0:
            used = torch.zeros(num_classes, dtype=torch.bool)
            used[classes] = True
            if not (got[2][~used] == 0).all():
                raise AssertionError(f"{where}: unsampled rows got a gradient")


def group_cuda() -> None:
    if not torch.cuda.is_available():
        raise AssertionError("the cuda group needs a CUDA device")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for margin_type in MARGINS:
            cuda_case(dtype, margin_type)


GROUPS = {
    "margins": group_margins,
    "shapes": group_shapes,
    "partial_fc": group_partial_fc,
    "half": group_half,
    "row_stats": group_row_stats,
    "cuda": group_cuda,
}


def main(argv: list[str]) -> int:
    if argv != ["cuda"]:
        require_interpreter()
        torch.set_num_threads(1)
    for name in argv:
        GROUPS[name]()
        print(f"group {name}: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
