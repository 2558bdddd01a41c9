"""scripts/bench_decode.py and scripts/bench_shared_prefix.py: their CPU smoke paths run every section and
write the summary keys the issues ask for (values from tiny shapes: they check the wiring, not speed)."""
from __future__ import annotations

import json
import math

import pytest
import torch

decode = pytest.importorskip("dms_scripts.bench_decode")
shared = pytest.importorskip("dms_scripts.bench_shared_prefix")

# decode_bw_fraction covers batch >= 8 at context >= 8K only: null at smoke shapes (decode_bw_fraction_best is set)
DECODE_KEYS = ["decode_bw_fraction_best", "ragged_cr8_time_vs_ideal", "attn_speedup_cr8_32k", "kv_memory_fraction_cr8",
               "decode_step_speedup_32k_b8", "decode_step_vs_floor_32k_b8", "speedup_vs_transformers_32k_b8",
               "fixed_memory_throughput_gain", "prefill_ratio_vs_dense"]


def _pos(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_decode_smoke_all_sections(tmp_path):
    out = tmp_path / "decode.json"
    assert decode.main(["--smoke", "--out", str(out), "--plot", str(tmp_path / "decode.png")]) == 0
    assert (tmp_path / "decode.png").stat().st_size > 1000
    res = json.loads(out.read_text())
    s = res["summary"]
    for k in DECODE_KEYS:
        assert _pos(s[k]), k
    sections = {r["section"] for r in res["rows"]}
    assert sections == {"kernel", "e2e_step", "fixed_memory", "prefill"}
    assert all(_pos(r["skew2_ms"]) and _pos(r["skew2_bw_fraction"]) for r in res["rows"] if r["section"] == "kernel")
    pre = [r for r in res["rows"] if r["section"] == "prefill"][0]
    assert _pos(pre["sdpa_dense_ms"]) and pre["memory_cr"] > 2  # calibrated retention evicts


def test_bench_decode_sections_subset_and_bad_section(tmp_path):
    out = tmp_path / "k.json"
    assert decode.main(["--smoke", "--sections", "kernel", "--out", str(out)]) == 0
    s = json.loads(out.read_text())["summary"]
    assert _pos(s["attn_speedup_cr8_32k"]) and s["decode_step_speedup_32k_b8"] is None
    with pytest.raises(SystemExit, match="unknown"):
        decode.main(["--smoke", "--sections", "kernel,nope", "--out", str(out)])


def test_bench_shared_prefix_tiny(tmp_path):
    out = tmp_path / "sp.json"
    assert shared.main(["--tiny", "--out", str(out), "--plot", str(tmp_path / "sp.png")]) == 0
    assert (tmp_path / "sp.png").stat().st_size > 1000
    res = json.loads(out.read_text())
    s = res["summary"]
    for k in ("speedup_vs_per_sample_w64_16k", "speedup_vs_dense_w64_16k", "step_bound_speedup_vs_per_sample_w64_16k"):
        assert _pos(s[k]), k
    for r in res["rows"]:
        # one shared copy reads fewer KV bytes than W private copies of the same pruned prompt
        assert r["shared_kv_read_bytes"] < r["per_sample_dms_kv_read_bytes"]
        assert r["step_bound_speedup_vs_per_sample"] > 1
        # the retention bias is calibrated for memory CR 8 (window included); the prefill reports what it reached
        assert 4 < r["prefix_memory_cr"] < 16, r["prefix_memory_cr"]
    assert s["prefix_memory_cr_16k"] == [r for r in res["rows"] if r["prompt"] == 128 and r["samples"] == 4][0]["prefix_memory_cr"]


def test_bench_decode_real_model_row(tmp_path, tiny_dms_checkpoint_factory):
    """--real-model: a retrofitted checkpoint's own decisions vs eviction off, through the same engine."""
    import torch

    import dms

    ckpt = tiny_dms_checkpoint_factory(tmp_path, window=4)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 50}" for i in range(300)))
    out = tmp_path / "d.json"
    assert decode.main(["--smoke", "--sections", "kernel", "--real-model", str(ckpt), "--real-context",
                        "48", "--real-batch", "2", "--real-prompt-file", str(text), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    row = [r for r in res["rows"] if r["section"] == "real_model"][0]
    assert row["context"] == 48 and row["batch"] == 2 and row["prompt"] == "text"
    assert row["memory_cr"] > 1.0 and _pos(row["dms_ms"]) and _pos(row["no_evict_ms"])
    assert res["summary"]["real_model_memory_cr"] == row["memory_cr"]
    # the tiny checkpoint's head dim (8) is not one the Triton kernels take: PyTorch cache backend, no graphs
    assert row["cache_backend"] == "torch" and row["cuda_graphs"] is False
    # eviction_off: nothing evicted inside, the checkpoint's offset back afterwards
    m2, _ = dms.load(str(ckpt))
    before = dms.dms_state(m2).config.alpha_offset
    ids = torch.randint(3, 40, (1, 40))
    with decode.eviction_off(m2):
        c = dms.DMSCache(m2)
        m2(ids, past_key_values=c, use_cache=True)
        assert c.stats()["memory_cr"] == 1.0
    assert dms.dms_state(m2).config.alpha_offset == before


skinny = pytest.importorskip("dms_scripts.bench_skinny_gemm")


def test_bench_skinny_gemm_smoke_with_sweep(tmp_path, monkeypatch):
    monkeypatch.setattr(skinny, "GRID", dict(bn=(16, 32), bk=(64,), warps=(2,), stages=(1,)))
    out = tmp_path / "skinny.json"
    assert skinny.main(["--smoke", "--sweep", "--rows", "3", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["shape"] for r in res["rows"]] == ["qkv", "o_proj+res", "gate_up", "down+res"]
    for r in res["rows"]:
        # every kernel equals its PyTorch form (fp16 on the CPU interpreter) and was timed
        assert r["default_max_err"] < 1e-2 and _pos(r["default_us"]) and _pos(r["cublas_us"])
        assert [s["cfg"][:2] for s in r["sweep"]] == [[16, 64], [32, 64]]
        assert all(s["max_err"] < 1e-2 for s in r["sweep"]) and r["best"] in r["sweep"]
        assert r["weight_copies"] * r["weight_bytes"] >= 4 * res["l2_bytes"]  # each call reads DRAM, not L2
    assert skinny.main(["--smoke", "--rows", "17", "--out", str(out)]) == 2


def test_row_generator_fixes_each_rows_lengths():
    """A benchmark row draws the same per-head lengths whatever other rows ran before it (and in
    bench_decode_variants.py, which builds the kernel section's rows with the same generator)."""
    def lens(ctx, B, name):
        return decode.ragged_lengths(B, 8, ctx, 2.0, 256, decode.row_generator("kernel", ctx, B, name))

    first = lens(8192, 8, "skew2")
    lens(32768, 32, "skew2"), lens(8192, 8, "cr8")  # other rows in between
    assert torch.equal(lens(8192, 8, "skew2"), first)
    assert not torch.equal(lens(8192, 8, "cr8"), first)
    assert not torch.equal(decode.ragged_lengths(8, 8, 8192, 2.0, 256, decode.row_generator("e2e", 8192, 8, "skew2")),
                           first)
