"""scripts/bench_quality.py planning helpers: memory-CR-matched retrofit targets, run order, summary (no training)."""
from __future__ import annotations

import importlib.util
import math
import pathlib
import statistics

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


def test_policy_budget_takes_fractional_crs_and_rounds_as_stated():
    from dms.eval.suite import PolicySystem, policy_budget

    # floor (nominal): context // CR, as before; ceil (matched): DMS's mean tokens held, rounded up
    assert policy_budget(4096, 2.0) == policy_budget(4096, 2.0, "ceil") == 2048
    assert policy_budget(4096, 2.18) == 1878 and policy_budget(4096, 2.18, "ceil") == 1879  # 4096 / 2.18 = 1878.9
    assert policy_budget(4096, 7.84) == 522 and policy_budget(4096, 7.84, "ceil") == 523  # more than 4096 / 8 = 512
    # memory CR = T / held is a float: float noise must not add a token when DMS held a whole number
    for held in range(1, 4097, 7):
        assert policy_budget(4096, 4096 / held, "ceil") == held
    with pytest.raises(ValueError, match="rounding"):
        policy_budget(4096, 2.0, "nearest")
    with pytest.raises(ValueError, match="rounding"):
        PolicySystem(torch.nn.Module(), "h2o", 2.0, rounding="round")
    bq = _script()
    assert bq.parse_args([]).matched_baselines and not bq.parse_args(["--no-matched-baselines"]).matched_baselines


def _matched_results():
    """dms-cr2 at memory CR 2.18 and dms-cr8 at 7.84; nominal and matched baseline rows, one of them stale."""
    from dms.eval.bench import matched_fields

    dms2 = {"ppl_increase": 0.010, "retrieval_accuracy": 0.90, "memory_cr": 2.18}
    dms8 = {"ppl_increase": 0.050, "retrieval_accuracy": 0.80, "memory_cr": 7.84}
    res = {"full": {"ppl": 10.0, "retrieval_accuracy": 1.0}, "dms-cr2": dms2, "dms-cr8": dms8,
           # nominal CR 2: sliding_window holds more tokens than DMS and wins on ppl
           "sliding_window@cr2": {"cr": 2.0, "ppl_increase": 0.005, "retrieval_accuracy": 0.40},
           "h2o@cr2": {"cr": 2.0, "ppl_increase": 0.020, "retrieval_accuracy": 0.60},
           # matched CR 2: at DMS's 2.18 it loses
           "sliding_window@cr2-matched": {**matched_fields("dms-cr2", dms2, 2.0), "ppl_increase": 0.012,
                                          "retrieval_accuracy": 0.35},
           "h2o@cr2-matched": {**matched_fields("dms-cr2", dms2, 2.0), "ppl_increase": 0.025,
                               "retrieval_accuracy": 0.55},
           "sliding_window@cr8": {"cr": 8.0, "ppl_increase": 0.060, "retrieval_accuracy": 0.20},
           "h2o@cr8": {"cr": 8.0, "ppl_increase": 0.070, "retrieval_accuracy": 0.10},
           # matched CR 8 (7.84: more tokens than nominal); the h2o row is stale (an older DMS evaluation, CR 7.5)
           "sliding_window@cr8-matched": {**matched_fields("dms-cr8", dms8, 8.0), "ppl_increase": 0.040,
                                          "retrieval_accuracy": 0.25},
           "h2o@cr8-matched": {**matched_fields("dms-cr8", {"memory_cr": 7.5}, 8.0), "ppl_increase": 0.001,
                               "retrieval_accuracy": 0.99}}
    return res


def test_summary_reports_the_matched_comparison_beside_the_nominal_one():
    res = _matched_results()
    main_runs = {2.0: "dms-cr2", 8.0: "dms-cr8"}
    nominal_only = {k: v for k, v in res.items() if not k.endswith("-matched")}
    s = summarize(res, [2.0, 8.0], main_runs, ["sliding_window", "h2o"], {})
    # the nominal fields are what they were without any matched row
    s0 = summarize(nominal_only, [2.0, 8.0], main_runs, ["sliding_window", "h2o"], {})
    assert {k: v for k, v in s.items() if "matched" not in k} == {k: v for k, v in s0.items() if "matched" not in k}
    assert s["best_baseline_ppl_increase_cr2"] == 0.005 and s["dms_beats_every_baseline_cr2"] is False
    # matched CR 2: both rows count
    assert s["matched_budget_cr2"] == 2.18 == s["dms_memory_cr_cr2"]
    assert s["best_baseline_ppl_increase_cr2_matched"] == 0.012
    assert s["best_baseline_ppl_increase_cr2_matched_policy"] == "sliding_window"
    assert s["best_baseline_retrieval_ratio_cr2_matched"] == pytest.approx(0.55)
    assert s["best_baseline_retrieval_ratio_cr2_matched_policy"] == "h2o"
    assert s["dms_beats_every_baseline_cr2_matched"] is True
    # matched CR 8: the stale h2o row (run at 7.5, not at DMS's 7.84) is left out, else DMS would lose
    assert s["matched_budget_cr8"] == 7.84
    assert s["best_baseline_ppl_increase_cr8_matched"] == 0.040
    assert s["best_baseline_retrieval_ratio_cr8_matched_policy"] == "sliding_window"
    assert s["dms_beats_every_baseline_cr8_matched"] is False  # 0.050 > 0.040
    assert s0["dms_beats_every_baseline_cr8"] is True
    # no matched rows: not measured (None), not "lost"
    assert s0["dms_beats_every_baseline_cr2_matched"] is None and s0["matched_budget_cr2"] is None
    assert s0["best_baseline_ppl_increase_cr2_matched_policy"] is None
    # the report: one margins row per budget, naming each budget; targets for both
    meta = {"command": "c", "device": "d", "versions": {}, "date": "t", "context": 4096}
    order = ["full", "dms-cr2", "sliding_window@cr2", "sliding_window@cr2-matched"]
    md = markdown_section(res, order, s, meta, [])
    assert "| 2 | nominal: CR 2, 2,048 tokens | 0.01 | 0.005 (sliding_window) | +0.005 |" in md
    assert "| 2 | matched: CR 2.18 (DMS's), 1,879 tokens | 0.01 | 0.012 (sliding_window) | -0.002 |" in md
    assert "| 8 | matched: CR 7.84 (DMS's), 523 tokens | 0.05 | 0.04 (sliding_window) | +0.01 |" in md
    assert "`<baseline>@crC-matched`" in md and "| sliding_window@cr2-matched |" in md
    assert "at CR2, nominal budget (context / CR): MISSED" in md
    assert "at CR2, budget-matched (baselines at DMS's memory CR 2.18): met" in md
    assert "at CR8, budget-matched (baselines at DMS's memory CR 7.84): MISSED" in md
    md0 = markdown_section(nominal_only, order[:3], s0, meta, [])
    assert "matched: CR" not in md0 and "budget-matched (baselines at DMS's memory CR -): not measured" in md0


def test_paired_ppl_margin_is_exact_and_its_standard_error_comes_from_the_rows():
    import math
    import statistics

    from dms.eval.bench import paired_ppl_margin

    a, b = {"row_nll": [2.0, 2.2, 1.9, 2.1]}, {"row_nll": [2.1, 2.2, 2.0, 2.1]}
    m, se, n = paired_ppl_margin(a, b)
    assert n == 4 and m == pytest.approx(math.exp(8.2 / 4) / math.exp(8.4 / 4) - 1)
    assert se == pytest.approx(statistics.stdev([-0.1, 0.0, -0.1, 0.0]) / 2)
    assert paired_ppl_margin(a, {"row_nll": [2.0]}) is None  # different rows: no pairing
    assert paired_ppl_margin(a, {}) is None and paired_ppl_margin(None, b) is None
    assert paired_ppl_margin({"row_nll": [1.0]}, {"row_nll": [1.5]})[1] is None  # one row: no error estimate


def test_summary_and_report_give_the_paired_ppl_margin_against_the_best_baseline():
    res = _matched_results()
    res["full"]["row_nll"] = [2.0, 2.0, 2.0]
    res["dms-cr2"]["row_nll"] = [2.01, 2.02, 2.00]
    res["sliding_window@cr2"]["row_nll"] = [2.00, 2.01, 2.00]  # the best nominal baseline by ppl
    res["h2o@cr2"]["row_nll"] = [1.0, 1.0, 1.0]  # not the best by ppl_increase: never paired
    res["sliding_window@cr2-matched"]["row_nll"] = [2.02, 2.03, 2.01]
    s = summarize(res, [2.0, 8.0], {2.0: "dms-cr2", 8.0: "dms-cr8"}, ["sliding_window", "h2o"], {})
    assert s["ppl_margin_cr2"] == pytest.approx(math.expm1(0.01 / 3 * 2))
    assert s["ppl_margin_se_cr2"] == pytest.approx(statistics.stdev([0.01, 0.01, 0.0]) / math.sqrt(3))
    assert s["ppl_margin_cr2_matched"] == pytest.approx(math.expm1(-0.01))
    assert s["ppl_margin_se_cr2_matched"] == pytest.approx(0.0, abs=1e-12)
    assert "ppl_margin_cr8" not in s and s["ppl_rows"] == 3  # no rows kept at CR 8: no paired figure
    meta = {"command": "c", "device": "d", "versions": {}, "date": "t", "context": 4096}
    md = markdown_section(res, ["full", "dms-cr2"], s, meta, [])
    assert f"| +0.005 | {s['ppl_margin_cr2']:+.3g} +- {s['ppl_margin_se_cr2']:.2g} | 0.9 |" in md
    assert "| 8 | nominal: CR 8, 512 tokens | 0.05 | 0.06 (sliding_window) | -0.01 | - |" in md


def test_paired_retrieval_margin_is_exact_in_base_units_with_a_per_task_standard_error():
    from dms.eval.bench import paired_retrieval_margin

    a = {"correct_by_task": {"passkey": [1, 1, 1, 0], "multikey": [1, 0, 1, 1, 1, 1], "variable_tracking": [0]}}
    b = {"correct_by_task": {"passkey": [1, 0, 0, 0], "multikey": [1, 0, 1, 0, 1, 1], "variable_tracking": [1]}}
    m, se, n = paired_retrieval_margin(a, b, 0.8)
    # retrieval = mean of the passkey and multikey accuracies (variable tracking is not retrieval)
    acc = lambda r, t: sum(r["correct_by_task"][t]) / len(r["correct_by_task"][t])
    ra, rb = [(acc(r, "passkey") + acc(r, "multikey")) / 2 for r in (a, b)]
    assert n == 10 and m == pytest.approx((ra - rb) / 0.8)
    var = statistics.variance([0, 1, 1, 0]) / 4 + statistics.variance([0, 0, 0, 1, 0, 0]) / 6
    assert se == pytest.approx(math.sqrt(var) / 2 / 0.8)
    assert paired_retrieval_margin(a, {"correct_by_task": {"passkey": [1], "multikey": [1] * 6}}, 0.8) is None
    assert paired_retrieval_margin(a, {"correct_by_task": {"multikey": [1] * 6}}, 0.8) is None  # a task missing
    assert paired_retrieval_margin(a, b, None) is None and paired_retrieval_margin(a, {}, 0.8) is None


def test_summary_and_report_give_the_paired_retrieval_margin_against_the_best_baseline():
    res = _matched_results()  # base retrieval 1.0; best nominal CR-2 baseline by retrieval: h2o (0.60)
    # examples that give the rows' accuracies: DMS 0.9, h2o 0.6
    res["dms-cr2"]["correct_by_task"] = {"passkey": [1] * 9 + [0], "multikey": [0] + [1] * 9}
    res["h2o@cr2"]["correct_by_task"] = {"passkey": [1] * 6 + [0] * 4, "multikey": [0] * 4 + [1] * 6}
    res["sliding_window@cr2"]["correct_by_task"] = {"passkey": [0] * 10, "multikey": [0] * 10}  # not the best: unpaired
    s = summarize(res, [2.0, 8.0], {2.0: "dms-cr2", 8.0: "dms-cr8"}, ["sliding_window", "h2o"], {})
    assert s["best_baseline_retrieval_ratio_cr2_policy"] == "h2o"
    assert s["retrieval_margin_cr2"] == pytest.approx(0.9 - 0.6)
    assert s["retrieval_margin_se_cr2"] > 0 and "retrieval_margin_cr2_matched" not in s  # matched rows lack examples
    meta = {"command": "c", "device": "d", "versions": {}, "date": "t", "context": 4096}
    md = markdown_section(res, ["full", "dms-cr2"], s, meta, [])
    assert f"| 0.6 (h2o) | +0.3 +- {s['retrieval_margin_se_cr2']:.2g} | no |" in md


WORDS = ("the kernel module loads a driver when the device appears and the user space daemon reads its "
         "configuration file before it starts the service on every boot").split()


def _tiny_base_and_corpus(root: pathlib.Path):
    """A 2-layer Llama + BPE tokenizer saved as a base checkpoint, and a small gzip JSONL corpus (no pretraining)."""
    import gzip
    import json
    import random

    from transformers import AutoModelForCausalLM, LlamaConfig

    from dms.base_models import train_tokenizer

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(150, 300))) + f" {rng.randint(0, 99999)}."
             for _ in range(60)]
    (root / "corpus").mkdir()
    for split, part in (("train", texts[:40]), ("validation", texts[40:])):
        with gzip.open(root / "corpus" / f"{split}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in part)
    tok = train_tokenizer(texts, 400, 1024)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    return root / "corpus", root / "base"


def test_smoke_run_evaluates_baselines_at_the_memory_cr_dms_achieved(tmp_path):
    """--smoke (on a tiny untrained base, main CRs 2 and 8, no ablations): every baseline is evaluated again at the
    memory CR its DMS run measured; a new DMS value re-evaluates only that run's matched rows."""
    import json
    import math

    bq = _script()
    corpus, base = _tiny_base_and_corpus(tmp_path)
    work = tmp_path / "work"
    argv = ["--smoke", "--corpus", str(corpus), "--base-model", str(base), "--work", str(work), "--crs", "2", "8",
            "--ablations", "--baselines", "sliding_window", "h2o", "quest", "--json", str(tmp_path / "q.json"),
            "--docs", str(tmp_path / "docs"), "--no-progress"]
    assert bq.main(argv + ["--stages", "retrofit", "eval", "report"]) == 0
    doc = json.loads((tmp_path / "q.json").read_text())
    rows, s = {r["system"]: r for r in doc["rows"]}, doc["summary"]
    T = doc["context"]
    assert T == 256 and doc["eval_config"]["matched_baselines"] is True
    for c in (2, 8):
        d = rows[f"dms-cr{c}"]
        m = d["memory_cr"]
        matched = {b: rows[f"{b}@cr{c}-matched"] for b in ("sliding_window", "h2o", "quest")}
        for b, r in matched.items():
            # run at the CR DMS measured, holding DMS's mean tokens per row/layer/KV head rounded up
            assert r["cr"] == m and r["matched_to"] == f"dms-cr{c}" and r["nominal_cr"] == c
            assert r["budget_rounding"] == "ceil" and r["budget_tokens"] == math.ceil(T / m - 1e-6)
            assert 0 <= r["budget_tokens"] - T / m < 1
            if b != "quest":  # eviction policies hold exactly that budget (Quest keeps all, limits reads)
                assert r["memory_cr"] == pytest.approx(T / r["budget_tokens"])
            assert rows[f"{b}@cr{c}"]["cr"] == c and "matched_to" not in rows[f"{b}@cr{c}"]
        assert s[f"matched_budget_cr{c}"] == m
        best = min(matched, key=lambda b: matched[b]["ppl_increase"])
        assert s[f"best_baseline_ppl_increase_cr{c}_matched"] == matched[best]["ppl_increase"]
        assert s[f"best_baseline_ppl_increase_cr{c}_matched_policy"] == best
        top = max(r["retrieval_accuracy"] for r in matched.values())
        base_ret = rows["full"]["retrieval_accuracy"]
        assert s[f"best_baseline_retrieval_ratio_cr{c}_matched"] == (top / base_ret if base_ret else None)
        assert s[f"dms_beats_every_baseline_cr{c}_matched"] == all(
            d["ppl_increase"] <= r["ppl_increase"] and d["retrieval_accuracy"] >= r["retrieval_accuracy"]
            for r in matched.values())
    assert "budget-matched" in (tmp_path / "docs" / "benchmarks.md").read_text()

    # DMS at CR 8 re-evaluated with another memory CR: its matched rows run again, nothing else is rewritten
    ev = work / "eval"
    before = {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in ev.glob("*.json")}
    d8 = json.loads((ev / "dms-cr8.json").read_text())
    d8["memory_cr"] = new = 256 / 77.5
    (ev / "dms-cr8.json").write_text(json.dumps(d8))
    assert bq.main(argv + ["--stages", "eval", "report"]) == 0
    after = {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in ev.glob("*.json")}
    assert set(after) == set(before)
    changed = {n for n in after if after[n] != before[n]}
    assert changed == {"dms-cr8.json", "sliding_window@cr8-matched.json", "h2o@cr8-matched.json",
                       "quest@cr8-matched.json"}
    r = json.loads((ev / "h2o@cr8-matched.json").read_text())
    assert r["cr"] == new and r["budget_tokens"] == 78 and r["memory_cr"] == pytest.approx(256 / 78)
    assert json.loads((tmp_path / "q.json").read_text())["summary"]["matched_budget_cr8"] == new


def test_tf32_setting_is_scoped():
    """The base-model build and bench_quality turn TF32 on for their own run only (a GPU run of the suite saw a
    later fp32 kernel test compare against a TF32 reference after a build had switched it on for good)."""
    import torch

    from dms.base_models import tf32_matmuls

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with tf32_matmuls(True):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    try:
        with tf32_matmuls(True):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
