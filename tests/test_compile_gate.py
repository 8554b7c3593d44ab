"""The ahead-of-time compile gate (tools/compile_gate.py): every Triton kernel the head can
launch, built for sm_90a and sm_80 on this CPU machine, without spills, on wgmma, pipelined.

Needs triton (its wheel carries ptxas, cuobjdump and nvdisasm); no GPU, no driver.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="the compile gate needs the triton package to compile")

from dist_cosface.classifier import triton_loss  # noqa: E402
from tools import compile_gate as gate  # noqa: E402

KERNELS = ("rows", "stats", "probs", "weight_grad", "input_grad")
GEMMS = KERNELS[1:]


@pytest.mark.slow
def test_every_launched_kernel_builds_for_sm90a_and_sm80_without_spills(capsys):
    variants = gate.default_variants()
    rows, summary = gate.run_gate(variants, gate.ARCHS, jobs=2)
    with capsys.disabled():
        print("\n" + gate.format_table(rows))
        print(summary)
    failed = [r for r in rows if r["problems"]]
    assert not failed, gate.format_table(failed)
    # every kernel for both targets, and the variants share them (D, N, C, margin and Partial FC
    # are runtime values: one build serves them all)
    built = {(r["kernel"], r["target"]) for r in rows}
    assert built == {(k, t) for k in KERNELS for t in ("sm_90a", "sm_80")}
    assert summary["launches"] > 10 * summary["unique_kernels"]
    for r in rows:
        assert r["spills"] == 0 and r["registers"] <= 255, r
        assert r["shared"] <= gate.GATE_SHARED_LIMIT[int(r["target"][3:5])], r
        assert r["blocks_per_sm"] >= 1, r
        if r["kernel"] in GEMMS and r["target"] == "sm_90a":
            # wgmma in the PTX, HGMMA in the SASS, MMAs in flight across the main loop
            assert r["wgmma"] > 0 and r["hgmma"] > 0 and r["hmma"] == 0, r
            assert r["wait_depth"] >= 1, r
        if r["kernel"] in GEMMS and r["target"] == "sm_80":
            assert r["hmma"] > 0 and r["wgmma"] == 0, r


def _compile_with_tiles(monkeypatch, tmp_path, name: str, tiles: triton_loss.Tiles) -> dict:
    """Record a bf16 head on sm_90a with ``tiles`` for kernel ``name``; compile that launch."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(triton_loss.TILES["sm90"], name, tiles)
    variant = gate.Variant("bfloat16", "float32", False, "cosface", 512, 256, 1000)
    (launch,) = [lc for lc in gate.record(variant, 90) if lc.name == name][:1]
    job = gate.to_job(launch, 90)
    return gate.row(job, gate.compile_job(job))


@pytest.mark.slow
def test_gate_rejects_the_landed_kernels_failure_modes(monkeypatch, tmp_path):
    """The two sm_90a faults found on the first kernels, reproduced with today's kernels."""
    # no software pipeline (the fp32 rows used to be converted in registers): every wgmma is
    # waited on at once
    row = _compile_with_tiles(
        monkeypatch, tmp_path, "stats",
        triton_loss.Tiles({"BLOCK_N": 64, "BLOCK_C": 128, "BLOCK_K": 64}, 4, 1),
    )  # fmt: skip
    assert row["wgmma"] > 0 and row["wait_depth"] == 0
    assert any("depth 0" in p for p in row["problems"]), row
    # M = 32 weight rows per tile: below wgmma's M = 64, so mma.sync (HMMA) only
    row = _compile_with_tiles(
        monkeypatch, tmp_path, "weight_grad",
        triton_loss.Tiles({"BLOCK_C": 32, "BLOCK_D": 128, "BLOCK_N": 64}, 4, 3),
    )  # fmt: skip
    assert row["wgmma"] == 0 and row["hmma"] > 0
    assert any("not lowered to wgmma" in p for p in row["problems"]), row


PTXAS_90 = """ptxas-blackwell info    : 0 bytes gmem
ptxas-blackwell info    : Compiling entry function 'k' for 'sm_90a'
ptxas-blackwell info    : Function properties for k
    8 bytes stack frame, 20 bytes spill stores, 24 bytes spill loads
ptxas-blackwell info    : Used 255 registers, used 1 barriers
"""
PTXAS_80 = """ptxas info    : Compiling entry function 'k' for 'sm_80'
ptxas info    : Function properties for k
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, 464 bytes cmem[0]
"""
CUOBJDUMP = """Resource usage:
 Function k:
  REG:255 STACK:8 SHARED:1024 LOCAL:44 CONSTANT[0]:608 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_resource_parsers_and_problems():
    assert gate.ptxas_resources(PTXAS_90) == {
        "registers": 255, "spill_stores": 20, "spill_loads": 24, "stack": 8,
    }  # fmt: skip
    assert gate.ptxas_resources(PTXAS_80)["registers"] == 168
    assert gate.cuobjdump_resources(CUOBJDUMP) == {
        "cuobjdump_registers": 255, "cuobjdump_stack": 8, "static_shared": 1024,
        "cuobjdump_local": 44,
    }  # fmt: skip
    sass = "  HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4]\n  HMMA.16816.F32.BF16 R0, R4"
    assert gate.sass_mma_counts(sass) == {"hgmma": 1, "hmma": 1}
    with pytest.raises(ValueError, match="register"):
        gate.ptxas_resources("ptxas fatal   : Unresolved extern function")
    job = gate.Job(
        "stats", "stats_kernel", 90, {"x_ptr": "*bf16", "UPCAST": "constexpr"},
        {(1,): False}, {}, {"num_warps": 4, "num_stages": 3},
    )  # fmt: skip
    res = {
        "error": None, **gate.ptxas_resources(PTXAS_90), **gate.cuobjdump_resources(CUOBJDUMP),
        "shared": 240_000, "wgmma": 0, "hgmma": 0, "hmma": 8, "wait_depth": None,
    }  # fmt: skip
    problems = " | ".join(gate.problems(job, res))
    for expected in ("spills 20+24", "240000 B > 232448", "not lowered to wgmma"):
        assert expected in problems
    assert gate.problems(job, {"error": "PTXASError: boom"}) == ["compile error: PTXASError: boom"]


def _ptx(body: str) -> str:
    return ".visible .entry k()\n{\n" + body + "\n}\n"


def test_wgmma_wait_depth_is_read_from_the_innermost_mma_loop():
    pipelined = _ptx(
        "$L__BB0_1:\n  wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {..};\n"
        "  wgmma.wait_group.sync.aligned 1;\n  @%p1 bra $L__BB0_1;\n"
        "  wgmma.wait_group.sync.aligned 0;"
    )
    assert gate.wgmma_loop_wait_depth(pipelined) == 1
    serial = _ptx(
        "$L__BB0_1:\n$L__BB0_2:\n  wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {..};\n"
        "  wgmma.wait_group.sync.aligned 0;\n  @%p2 bra $L__BB0_2;\n  @%p1 bra $L__BB0_1;"
    )
    assert gate.wgmma_loop_wait_depth(serial) == 0
    assert gate.wgmma_loop_wait_depth(_ptx("  mma.sync.aligned.m16n8k16 {..};")) is None


def test_blocks_per_sm_estimate():
    # 206 registers x 8 warps (the landed grad kernel): 8 x 6,656 of 65,536 registers, 1 block
    assert gate.blocks_per_sm(90, 206, 8, 32_768) == 1
    assert gate.blocks_per_sm(90, 128, 4, 49_152) == 4  # registers allow 4, shared allows 4
    assert gate.blocks_per_sm(90, 64, 4, 100_000) == 2  # shared memory bound
    assert gate.blocks_per_sm(80, 32, 1, 0) == 32  # the per-SM block limit


def test_config_variant_and_roofline():
    (v,) = gate.config_variants("configs/webface42m_r100_pfc.yaml", 64, [])
    assert (v.dtype, v.rows_dtype, v.partial_fc, v.margin_type) == (
        "bfloat16", "float32", True, "cosface",
    )  # fmt: skip
    assert (v.dim, v.batch, v.classes) == (512, 128 * 64, -(-2_059_906 // 64))
    est = {r["kernel"]: r for r in gate.roofline(1024, 2_000_000, 512)}
    flops = 2 * 1024 * 2_000_000 * 512
    assert est["stats"]["gflop"] == pytest.approx(flops / 1e9)
    assert est["stats"]["H100_ms"] == pytest.approx(1e3 * flops / 989e12)  # compute bound
    # the rows pass is pure traffic: read fp32, write bf16, 1/|w|
    assert est["rows"]["H200_ms"] == pytest.approx(1e3 * (2e6 * 512 * 6 + 8e6) / 4.8e12)
