"""scripts/bench_train_attention.py: the --smoke path runs on CPU (Triton kernels under TRITON_INTERPRET=1,
set by conftest) and writes every summary key the benchmark promises; subsets give null, not a crash."""
from __future__ import annotations

import json
import math

import pytest
import torch

bench = pytest.importorskip("dms_scripts.bench_train_attention")

SUMMARY_KEYS = [f"ratio_vs_sdpa_L{L}" for L in (2048, 4096, 8192, 16384, 32768)] + [
    "ratio_vs_flex_L8192", "dms_overhead_vs_nomask_L8192", "retrofit_step_ratio_vs_flex"]


def _positive_finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_smoke_both_sections_then_merge(tmp_path):
    out = tmp_path / "smoke.json"
    # kernel section with a subset of methods (sdpa only: fast on CPU), step section with ours and flex
    bench.main(["--smoke", "--methods", "sdpa", "--step-methods", "triton,flex", "--out", str(out)])
    res = json.loads(out.read_text())
    s = res["summary"]
    for k in SUMMARY_KEYS:
        assert k in s, k
    assert _positive_finite(s["retrofit_step_ratio_vs_flex"])
    assert _positive_finite(s["retrofit_step_speedup_vs_flex"])
    assert s["ratio_vs_flex_L8192"] is None and s["ratio_vs_sdpa_L8192"] is None  # not measured -> null
    assert "lower is better" in s["note"]
    rows = {r["method"]: r for r in res["step"]["rows"]}
    assert rows["triton"]["attention_ran"] == "dms_kernels.train_attention:dms_attention"
    assert rows["triton"]["kernel_calls_per_step"] == res["step"]["config"]["model"]["num_hidden_layers"]
    if not torch.cuda.is_available():
        assert rows["flex"]["stand_in"]  # CPU: FlexAttention has no backward, the row says what ran instead
    else:  # GPU: the real FlexAttention ran
        assert "stand_in" not in rows["flex"] and rows["flex"]["attention_ran"].endswith("dms_attention_flex")
    assert res["step"]["config"]["gradient_checkpointing"] is False
    assert [r["method"] for r in res["rows"]] == ["sdpa"]

    # kernel section alone, merged with the step rows of the first run: the step key survives
    out2 = tmp_path / "merged.json"
    bench.main(["--smoke", "--sections", "kernels", "--methods", "sdpa", "--merge", str(out), "--out", str(out2)])
    res2 = json.loads(out2.read_text())
    assert res2["merged_from"]["sections"] == ["step"]
    assert res2["summary"]["retrofit_step_ratio_vs_flex"] == s["retrofit_step_ratio_vs_flex"]


def test_summary_with_missing_entries_is_null():
    kernel_rows = [dict(L=8192, method="ours", fwd_bwd_ms=2.0), dict(L=8192, method="flex", fwd_bwd_ms=4.0),
                   dict(L=4096, method="sdpa", error="OOM")]
    s = bench.summarize(kernel_rows, [dict(method="triton", step_ms=10.0), dict(method="flex", error="x")])
    for k in SUMMARY_KEYS:
        assert k in s
    assert s["ratio_vs_flex_L8192"] == 0.5
    assert s["ratio_vs_sdpa_L8192"] is None and s["dms_overhead_vs_nomask_L8192"] is None
    assert s["retrofit_step_ratio_vs_flex"] is None
    s = bench.summarize([], [dict(method="triton", step_ms=10.0), dict(method="flex", step_ms=12.5)])
    assert s["retrofit_step_ratio_vs_flex"] == 0.8 and s["retrofit_step_speedup_vs_flex"] == 1.25


@pytest.mark.parametrize("argv,message", [
    (["--methods", "ours,magic"], "--methods"),
    (["--step-methods", "triton,magic"], "--step-methods"),
    (["--sections", "kernels,nope"], "--sections"),
])
def test_bad_names_are_refused(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        bench.main(["--smoke", "--out", str(tmp_path / "x.json"), *argv])
    assert not (tmp_path / "x.json").exists()


def test_sweep_candidates_parse_and_refuse_bad_specs():
    c = bench.parse_sweep_cands("fwd=128,128,8,2,t;128,64,8,3|dkdv=32,64,4,3,t,s")
    assert c == {"fwd": ["128,128,8,2,t", "128,64,8,3"], "dkdv": ["32,64,4,3,t,s"]}
    assert bench.parse_sweep_config("32,64,4,3,t,s") == dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3,
                                                            tma=True, dlk_tile=True)
    assert bench.parse_sweep_config("128,64,8,3,p") == dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3,
                                                           tma=False)
    assert bench.parse_sweep_cands(None) == bench.SWEEP_DEFAULT_CANDS
    for bad in ("fwd=128,128,8", "fwd=128,128,8,2,x", "bwd=128,128,8,2", "fwd 128,128,8,2"):
        with pytest.raises(ValueError, match="sweep"):
            bench.parse_sweep_cands(bad)
