"""scripts/bench_quality.py planning helpers: memory-CR-matched retrofit targets, run order, summary (no training)."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

from dms.eval.bench import RunSpec, decision_target, markdown_section, summarize
from dms.eval.suite import _DecisionTally


def _script():
    spec = importlib.util.spec_from_file_location("_bench_quality",
                                                  pathlib.Path(__file__).parents[2] / "scripts" / "bench_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_decision_target_gives_the_memory_cr_the_evaluation_measures():
    T, w, cr = 1024, 64, 8.0
    d = decision_target(cr, T, w)
    assert d == pytest.approx((T - w) / (T / cr - w)) == pytest.approx(15.0)
    # Evict all but every d-th decided token: the tally of the evaluation then reports memory CR == cr.
    evict = torch.ones(1, T, 2, dtype=torch.bool)
    evict[:, ::15] = False
    evict[:, -1] = False  # the last token has no decision yet
    tally = _DecisionTally(w)
    tally.add({0: {"evicted": evict[0].float().sum(0), "count": torch.tensor(float(T - 1)), "evict_mask": evict}}, T, 1)
    assert tally.result()["memory_cr"] == pytest.approx(cr, rel=0.02)
    assert decision_target(8, 4096, 0) == 8.0 and decision_target(1, 4096, 128) == pytest.approx(1.0)
    assert decision_target(8, 4096, 128) == pytest.approx(3968 / 384)
    with pytest.raises(ValueError, match="window"):
        decision_target(8, 2048, 256)  # the window alone holds the whole budget
    with pytest.raises(ValueError):
        decision_target(0.5, 2048, 8)


def test_run_specs_order_and_targets(tmp_path):
    bq = _script()
    args = bq.parse_args(["--crs", "2", "4", "8", "--window", "128", "--seq-len", "4096", "--ablation-windows", "64",
                          "256"])
    specs = bq.run_specs(args)
    names = [s.name for s in specs]
    # Main CRs first, then the ablations in the order a deadline should cut them (from the end).
    assert names == ["dms-cr8", "dms-cr4", "dms-cr2", "dms-cr8-qneuron", "dms-cr8-fullft", "dms-cr8-w0", "dms-cr8-w64",
                     "dms-cr8-w256"]
    by = {s.name: s for s in specs}
    assert by["dms-cr8"].decision_target == pytest.approx(3968 / 384)
    assert by["dms-cr8-w0"].decision_target == 8.0 and by["dms-cr8-w256"].decision_target == pytest.approx(15.0)
    assert (by["dms-cr8-qneuron"].retention, by["dms-cr8-qneuron"].trainable) == ("q_neuron", "full")
    assert by["dms-cr8-fullft"].trainable == "full" and by["dms-cr8-fullft"].lr == args.full_lr
    assert args.ppl_len == 4096
    nominal = bq.run_specs(bq.parse_args(["--cr-definition", "decision", "--window", "128", "--seq-len", "4096"]))
    assert all(s.decision_target == s.cr for s in nominal)
    with pytest.raises(ValueError, match="window"):
        bq.run_specs(bq.parse_args(["--window", "512", "--seq-len", "2048"]))  # 2048 / 8 = 256 < 512
    # main() refuses such a window before it spends minutes building a base model.
    argv = ["--window", "512", "--seq-len", "2048", "--work", str(tmp_path / "w"), "--corpus", str(tmp_path)]
    assert bq.main(argv) == 2
    assert not (tmp_path / "w" / "base").exists()
    smoke = bq.parse_args(["--smoke"])
    assert smoke.device == "cpu" and smoke.ppl_len == smoke.seq_len == 256 and len(bq.run_specs(smoke)) == 8


def test_window_share_gives_each_cr_its_own_window():
    bq = _script()
    args = bq.parse_args(["--crs", "2", "4", "8", "--window-share", "0.5", "--seq-len", "4096", "--ablation-windows",
                          "64", "128", "256"])
    by = {s.name: s for s in bq.run_specs(args)}
    # half of each budget (4096 / CR tokens held) is the recent window
    assert [by[f"dms-cr{c}"].window for c in (2, 4, 8)] == [1024, 512, 256]
    assert by["dms-cr2"].decision_target == pytest.approx((4096 - 1024) / (2048 - 1024))
    # ablations sit at the largest CR's window; that window is not repeated as a window ablation
    assert by["dms-cr8-qneuron"].window == by["dms-cr8-fullft"].window == 256
    assert "dms-cr8-w256" not in by and {"dms-cr8-w64", "dms-cr8-w128", "dms-cr8-w0"} <= set(by)
    for bad in ("0", "1", "1.5"):
        with pytest.raises(SystemExit):
            bq.parse_args(["--window-share", bad])
    # one CR may take its own share
    args = bq.parse_args(["--crs", "2", "4", "8", "--window-share", "0.5", "--window-share-at", "2=0.75",
                          "--seq-len", "4096"])
    by = {s.name: s for s in bq.run_specs(args)}
    assert [by[f"dms-cr{c}"].window for c in (2, 4, 8)] == [1536, 512, 256]
    for bad in (["--window-share-at", "3=0.5"], ["--window-share-at", "2=1.2"], ["--window-share-at", "2:0.5"],
                ["--window-share-at", "2=0.75", "--window-share", None]):
        argv = ["--crs", "2", "4", "8", "--window-share", "0.5"] + [x for x in bad if x is not None]
        if None in bad:
            argv = ["--crs", "2", "4", "8", "--window-share-at", "2=0.75"]
        with pytest.raises(SystemExit):
            bq.parse_args(argv)


def test_retrofit_config_trains_for_the_decision_target(tmp_path):
    from dms.eval.bench import retrofit_config

    spec = RunSpec("dms-cr8", 8.0, 128, target_cr=10.3)
    cfg = retrofit_config(spec, tmp_path, tmp_path / "mix.jsonl.gz", tmp_path / "out", 10, 4096, 2, "auto", 0, False,
                          dtype="bfloat16")
    assert cfg.train.cr == 10.3 and cfg.model.dtype == "bfloat16" and cfg.dms.window == 128
    assert RunSpec("x", 4.0, 0).decision_target == 4.0


def test_summary_steps_use_the_decision_target_and_report_names_the_context():
    res = {"full": {"ppl": 10.0, "retrieval_accuracy": 1.0},
           "dms-cr8": {"ppl_increase": 0.05, "retrieval_accuracy": 0.9, "memory_cr": 8.0, "decision_cr": 10.2}}
    rows = [{"step": 5, "decision_cr": 8.0}, {"step": 9, "decision_cr": 9.9}]
    s = summarize(res, [8.0], {8.0: "dms-cr8"}, [], {"dms-cr8": rows}, {"dms-cr8": 10.33})
    assert s["steps_to_cr8"] == 9  # 8.0 is the nominal (memory) CR, not what the retrofit aimed at
    assert summarize(res, [8.0], {8.0: "dms-cr8"}, [], {"dms-cr8": rows})["steps_to_cr8"] == 5
    meta = {"command": "c", "device": "d", "versions": {}, "date": "t", "context": 4096, "targets_line": "TARGETS"}
    md = markdown_section(res, ["full", "dms-cr8"], s, meta, [])
    assert "4,096-token perplexity rows" in md and "TARGETS" in md


def test_quest_page_sizes_are_baselines_and_the_note_names_the_accounting():
    bq = _script()
    args = bq.parse_args(["--quest-page-sizes", "16", "32", "64"])
    assert args.quest_metadata == "count"
    systems = bq.baseline_systems(args)
    assert [n for n, _, _ in systems] == ["sliding_window", "streaming_llm", "h2o", "tova", "quest", "quest-p32",
                                          "quest-p64"]
    assert systems[-1][1:] == ("quest", {"page_size": 64, "quest_metadata": "count"})
    assert [n for n, _, _ in bq.baseline_systems(bq.parse_args(["--quest-metadata", "ignore"]))][-1] == "quest"
    with pytest.raises(SystemExit):
        bq.parse_args(["--quest-metadata", "pages"])
    res = {"full": {"retrieval_accuracy": 1.0},
           "quest@cr8": {"policy": "quest", "ppl_increase": 0.2, "retrieval_accuracy": 0.5},
           "quest-p32@cr8": {"policy": "quest", "ppl_increase": 0.1, "retrieval_accuracy": 0.7}}
    s = summarize(res, [8.0], {}, [n for n, _, _ in systems], {})
    assert s["best_baseline_ppl_increase_cr8_policy"] == "quest-p32"
    assert s["best_baseline_retrieval_ratio_cr8"] == pytest.approx(0.7)
    meta = {"command": "c", "device": "d", "versions": {}, "date": "t"}
    md = markdown_section(res, ["quest@cr8"], s, {**meta, "quest_metadata": "count"}, [])
    assert "page metadata" in md and "one token-equivalent per page" in md and "same reads budget" in md
    assert "--quest-metadata ignore" in markdown_section(res, [], s, {**meta, "quest_metadata": "ignore"}, [])
