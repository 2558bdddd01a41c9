"""The evaluation suite (dms.eval) and reference base models (dms.base_models) on tiny models: correctness only."""
from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import pathlib
import random
import re

import pytest
import torch

from dms.base_models import BaseModelConfig, build_base_model, train_tokenizer
from dms.eval import DMSSystem, EvalConfig, EvalData, PolicySystem, TaskBuilder, answer_correct, evaluate_system
from dms.eval.suite import greedy_generate

_spec = importlib.util.spec_from_file_location("_cf_eval", pathlib.Path(__file__).parents[1] / "conftest.py")
cf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cf)

WORDS = ("the kernel module loads a driver when the device appears and the user space daemon reads its "
         "configuration file before it starts the service on every boot").split()


def _texts(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(150, 300))) + f" {rng.randint(0, 99999)}."
            for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for split, n in (("train", 40), ("validation", 10)):
        with gzip.open(d / f"{split}.jsonl.gz", "wt") as f:
            for t in _texts(n, hash(split) % 1000):
                f.write(json.dumps({"text": t}) + "\n")
    return d


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(_texts(30, 1), 400, 1024)


@pytest.fixture(scope="module")
def data(tok, corpus):
    cfg = EvalConfig(lengths=[256], n_per_task=2, ppl_rows=2, ppl_len=64, batch_size=2, prefill_chunk=32,
                     max_new_tokens=4, n_keys=2, hops=1)
    return cfg, EvalData.build(tok, corpus / "validation.jsonl.gz", cfg)


def test_task_prompts_exact_length_deterministic_and_answerable(tok, corpus):
    from dms.eval.tasks import read_corpus, token_stream

    stream = token_stream(tok, read_corpus(corpus / "validation.jsonl.gz"))
    b1, b2 = TaskBuilder(tok, stream, seed=3), TaskBuilder(tok, stream, seed=3)
    for make in (lambda b: b.passkey(200, 0.5, 1), lambda b: b.multikey(300, 3, 2), lambda b: b.variable_tracking(400, 2, 0)):
        e1, e2 = make(b1), make(b2)
        assert len(e1.input_ids) == e1.meta.get("length", len(e1.input_ids)) and e1.input_ids == e2.input_ids
        assert e1.answer in tok.decode(e1.input_ids)  # the fact is planted in the prompt
    assert b1.passkey(200, 0.5, 1).input_ids != TaskBuilder(tok, stream, seed=4).passkey(200, 0.5, 1).input_ids
    doc = tok.decode(b1.pretraining_document(random.Random(0), 400))
    assert "pass key" in doc or "magic number" in doc or "VAR" in doc
    with pytest.raises(ValueError, match="too short"):
        b1.multikey(20, 4)
    assert answer_correct(" 12345.\nWhat", "12345") and not answer_correct(" 1234", "12345")


def test_full_cache_system_matches_teacher(tok, data):
    cfg, d = data
    model = cf.tiny_model("llama", vocab=len(tok), max_position_embeddings=1024)
    r = evaluate_system(PolicySystem(model, "full"), model, tok, d, cfg, progress=False)
    assert abs(r["ppl_increase"]) < 1e-4 and abs(r["kl"]) < 1e-5 and r["memory_cr"] == 1.0
    assert set(r["task_accuracy"]) == {"passkey", "multikey", "variable_tracking"}
    assert r["decode_kv_reads"] > 0 and r["peak_tokens_held_per_row"] > 0
    h = evaluate_system(PolicySystem(model, "h2o", cr=4), model, tok, d, cfg, progress=False)
    assert h["memory_cr"] == pytest.approx(4.0) and h["decode_kv_reads"] < r["decode_kv_reads"]


def test_perplexity_keeps_each_rows_nll_for_paired_comparisons(tok, data):
    import math

    cfg, d = data
    model = cf.tiny_model("llama", vocab=len(tok), max_position_embeddings=1024)
    r = evaluate_system(PolicySystem(model, "sliding_window", cr=4), model, tok, d, cfg, progress=False)
    assert len(r["row_nll"]) == len(r["row_nll_teacher"]) == d.rows.shape[0] == 2
    # equal-length rows: the perplexity is exp of the mean row NLL, for the system and for the teacher
    assert math.exp(sum(r["row_nll"]) / 2) == pytest.approx(r["ppl"], rel=1e-6)
    assert math.exp(sum(r["row_nll_teacher"]) / 2) == pytest.approx(r["teacher_ppl"], rel=1e-6)
    assert r["row_nll"] != r["row_nll_teacher"]  # a 16-token window changes 64-token rows
    # task results per example, in example order, for paired retrieval comparisons
    got = r["correct_by_task"]
    assert set(got) == {"passkey", "multikey", "variable_tracking"} and all(len(v) == 2 for v in got.values())
    for t, v in got.items():
        assert sum(v) / len(v) == pytest.approx(r["task_accuracy"][t]) and set(v) <= {0, 1}
    assert r["retrieval_accuracy"] == pytest.approx((r["task_accuracy"]["passkey"] + r["task_accuracy"]["multikey"]) / 2)


def test_document_rows_never_cross_a_document_boundary(tok, corpus):
    from dms.eval.tasks import read_corpus

    texts = read_corpus(corpus / "validation.jsonl.gz")
    docs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    cfg = EvalConfig(lengths=[256], n_per_task=1, ppl_rows=1000, ppl_len=48, ppl_rows_from="documents")
    rows = EvalData.build(tok, corpus / "validation.jsonl.gz", cfg).rows
    want = [ids[s:s + 48] for ids in docs for s in range(0, len(ids) - 47, 48)]
    assert rows.tolist() == want and len(want) > len(docs)  # every slice of every document, in order
    assert tok.eos_token_id not in rows.unique().tolist()
    few = EvalData.build(tok, corpus / "validation.jsonl.gz", dataclasses.replace(cfg, ppl_rows=3)).rows
    assert few.tolist() == want[:3]
    stream = EvalData.build(tok, corpus / "validation.jsonl.gz", dataclasses.replace(cfg, ppl_rows_from="stream")).rows
    assert tok.eos_token_id in stream.unique().tolist()  # packed rows do cross boundaries
    longest = max(len(x) for x in docs)
    with pytest.raises(ValueError, match="no document .* has ppl_len"):
        EvalData.build(tok, corpus / "validation.jsonl.gz", dataclasses.replace(cfg, ppl_len=longest + 1))


def test_quest_system_records_its_read_accounting(tok, data):
    cfg, d = data
    model = cf.tiny_model("llama", vocab=len(tok), max_position_embeddings=1024)
    q = evaluate_system(PolicySystem(model, "quest", cr=4), model, tok, d, cfg, progress=False)
    assert (q["policy"], q["page_size"], q["quest_metadata"]) == ("quest", 16, "count")
    # 256-token prompts, budget 64: each decode step reads 17 pages of metadata + 2 pages (own one partial).
    assert 0 < q["quest_metadata_reads"] < q["decode_kv_reads"] and q["quest_over_budget_queries"] == 0
    old = evaluate_system(PolicySystem(model, "quest", cr=4, quest_metadata="ignore"), model, tok, d, cfg, progress=False)
    assert old["quest_metadata"] == "ignore" and old["quest_metadata_reads"] == 0
    assert old["decode_kv_reads"] > q["decode_kv_reads"]  # 4 pages vs 2 pages + metadata


def test_dms_system_crs_match_the_cache(tok, data, randomize):
    import dms

    cfg, d = data
    teacher = cf.tiny_model("qwen3", vocab=len(tok), max_position_embeddings=1024)
    model = cf.tiny_model("qwen3", vocab=len(tok), max_position_embeddings=1024)
    dms.retrofit(model, dms.DMSConfig(window=4, attention_impl="eager"))
    randomize(model)
    model.eval()
    sys_ = DMSSystem(model)
    r = evaluate_system(sys_, teacher, tok, d, cfg, progress=False, keep_answers=True)
    assert r["decision_cr"] > 1.05 and r["memory_cr"] > 1.05 and r["kl"] > 0
    assert len(r["memory_cr_per_layer"]) == 2 and len(r["memory_cr_per_head"][0]) == 2
    assert len(r["decision_cr_per_head"]) == 2 and len(r["answers"]) == len(d.examples)
    # The memory CR from the hard mask equals what the reference DMSCache holds after the same rows.
    rows = d.rows.clone()
    cache = dms.DMSCache(model)
    with torch.no_grad():
        for s in range(0, rows.shape[1], 16):
            model(input_ids=rows[:, s:s + 16], past_key_values=cache, use_cache=True)
    assert cache.stats()["memory_cr"] == pytest.approx(r["memory_cr"], rel=1e-6)


def test_greedy_generate_dms_without_eviction_equals_full(tok, data):
    import dms

    cfg, d = data
    model = cf.tiny_model("llama", vocab=len(tok), max_position_embeddings=1024)
    ids = torch.tensor([e.input_ids for e in d.examples[:2]])
    full = PolicySystem(model, "full")
    a = greedy_generate(model, ids, full.new_cache(ids.shape[1]), 5, 32)
    dms.retrofit(model, dms.DMSConfig(window=4, attention_impl="eager"))  # fresh heads evict nothing
    b = greedy_generate(model, ids, dms.DMSCache(model), 5, 32)
    assert torch.equal(a, b)


def test_base_model_build_tiny(corpus, tmp_path):
    cfg = BaseModelConfig(vocab_size=400, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                          intermediate_size=64, seq_len=64, batch_size=2, steps=3, warmup_steps=1, tokenizer_chars=20000)
    info = build_base_model(corpus, tmp_path / "m", cfg, seed=0, device="cpu", progress=False, log=lambda *_: None)
    assert info["steps_done"] == 3 and info["val_loss"] > 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    t = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert m.config.num_key_value_heads == 2 and t.tokenize("x 123") == t.tokenize("x 123")
    assert [p for p in t.tokenize(" 123") if any(ch.isdigit() for ch in p)] == ["1", "2", "3"]
    with pytest.raises(ValueError, match="not empty"):
        build_base_model(corpus, tmp_path / "m", cfg, device="cpu", progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="family"):
        BaseModelConfig(family="gpt2")


def test_eval_config_validation():
    with pytest.raises(ValueError, match="lengths"):
        EvalConfig(lengths=[8])
    with pytest.raises(ValueError, match="depths"):
        EvalConfig(depths=[1.5])
    with pytest.raises(ValueError, match="ppl_rows_from must be one of .*'docs'"):
        EvalConfig(ppl_rows_from="docs")
    with pytest.raises(ValueError, match="unknown policy"):
        PolicySystem(cf.tiny_model(), "lru")


def test_report_helpers(tmp_path):
    from dms.eval.bench import steps_to_cr, summarize, write_section

    res = {"full": {"ppl": 10.0, "retrieval_accuracy": 1.0},
           "dms-cr8": {"ppl_increase": 0.05, "retrieval_accuracy": 0.9, "memory_cr": 7.0},
           "h2o@cr8": {"ppl_increase": 0.2, "retrieval_accuracy": 0.5}}
    rows = [{"step": 1, "decision_cr": 2.0}, {"step": 2, "decision_cr": 7.9}]
    s = summarize(res, [8.0], {8.0: "dms-cr8"}, ["h2o"], {"dms-cr8": rows})
    assert s["ppl_increase_cr8"] == 0.05 and s["retrieval_ratio_cr8"] == pytest.approx(0.9)
    assert s["best_baseline_retrieval_ratio_cr8"] == 0.5 and s["dms_beats_every_baseline_cr8"] and s["steps_to_cr8"] == 2
    assert steps_to_cr(rows, 16) is None
    md = tmp_path / "b.md"
    md.write_text("# Benchmarks\n\n## Other\nkeep me\n\n## Quality\nold\n\n## Tail\nkeep too\n")
    write_section(md, "## Quality\nnew\n")
    text = md.read_text()
    assert "keep me" in text and "keep too" in text and "new" in text and "old" not in text


def test_evaluate_script_on_dms_checkpoint(tok, corpus, tmp_path, randomize):
    import dms

    model = cf.tiny_model("llama", vocab=len(tok), max_position_embeddings=1024)
    dms.retrofit(model, dms.DMSConfig(window=4, attention_impl="eager"))
    randomize(model)
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    spec = importlib.util.spec_from_file_location("_evaluate", pathlib.Path(__file__).parents[2] / "scripts" / "evaluate.py")
    ev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ev)
    out = tmp_path / "r.json"
    rc = ev.main([str(tmp_path / "ckpt"), "--corpus-file", str(corpus / "validation.jsonl.gz"), "--lengths", "256",
                  "--n-per-task", "1", "--ppl-rows", "1", "--ppl-len", "64", "--batch-size", "2", "--prefill-chunk", "64",
                  "--max-new-tokens", "3", "--n-keys", "2", "--hops", "1", "--out", str(out), "--no-progress",
                  "--device", "cpu"])
    assert rc == 0
    r = json.loads(out.read_text())["results"][0]
    assert r["policy"] == "dms" and r["decision_cr"] > 1 and r["kl"] > 0 and "memory_cr_per_head" in r
    assert ev.main([str(tmp_path / "nope"), "--no-progress"]) == 2


def _ngrams(ids, n):
    return {tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)}


def test_pretraining_mix_formats_and_answers(tok, corpus):
    from dms.eval.tasks import PretrainMix, read_corpus, token_stream

    b = TaskBuilder(tok, token_stream(tok, read_corpus(corpus / "train.jsonl.gz")), seed=0)
    rng = random.Random(5)
    mk = PretrainMix(weights=(0, 1, 0), min_keys=3, max_keys=6, max_questions=2)
    for _ in range(20):
        text = tok.decode(b.pretraining_document(rng, 600, mk))
        facts = dict(re.findall(r"The special magic number for (\w+) is (\d+)\.\n", text.split("What is")[0]))
        answers = re.findall(r"What is the special magic number for (\w+)\? The special magic number for \1 is (\d+)\.",
                             text)
        assert 3 <= len(facts) <= 6 and 1 <= len(answers) <= 2 and len({k for k, _ in answers}) == len(answers)
        assert all(facts[k] == v for k, v in answers)  # every question is answered with its own key's value
    vt = PretrainMix(weights=(0, 0, 1), max_hops=2, max_questions=4)
    for _ in range(20):
        text = tok.decode(b.pretraining_document(rng, 600, vt))
        body = text.split("\nQuestion:")[0]
        direct = dict(re.findall(r"VAR (\w+) = (\d+)\.", body))
        links = dict(re.findall(r"VAR (\w+) = VAR (\w+)\.", body))
        assert len(direct) == 2 and len(links) % 2 == 0 and len(links) <= 4  # two chains of equal length, <= 2 hops

        def value(x):
            return direct.get(x) or value(links[x])

        qa = re.findall(r"what value does VAR (\w+) hold\? Answer: VAR \1 holds (\d+)\.", text)
        assert 1 <= len(qa) <= 4 and all(value(x) == v for x, v in qa)  # any hop depth, resolved through the chain
    for bad in (dict(weights=(1, 1)), dict(weights=(0, 0, 0)), dict(min_keys=5, max_keys=4), dict(max_hops=-1)):
        with pytest.raises(ValueError):
            PretrainMix(**bad)
    with pytest.raises(ValueError, match="weights"):
        BaseModelConfig(mix_weights=(1, -1, 0))


def test_pretraining_rows_never_contain_evaluation_items(tok, corpus):
    """Eval prompts come from the validation split and their own seeds; pretraining rows from the train split."""
    from dms.base_models import MixedRows
    from dms.eval.tasks import read_corpus, token_stream

    cfg = EvalConfig(lengths=[256], n_per_task=4, ppl_rows=0, n_keys=3, hops=1, seed=1234)
    data = EvalData.build(tok, corpus / "validation.jsonl.gz", cfg)
    streams = {s: token_stream(tok, read_corpus(corpus / f"{s}.jsonl.gz")) for s in ("train", "validation")}

    def overlap(split):
        rows = MixedRows(TaskBuilder(tok, streams[split], seed=0), streams[split], 512, 1.0, seed=0,
                         eos_id=tok.eos_token_id)
        seen = set()
        text = ""
        for _ in range(80):
            r = rows.row()
            seen |= _ngrams(r, 64)
            text += tok.decode(r)
        # 64 tokens are longer than any template-only span, so a shared 64-gram would be shared filler or a fact.
        grams = [g for e in data.examples for g in _ngrams(e.input_ids, 64)]
        return sum(g in seen for g in grams) / len(grams), text

    frac, text = overlap("train")
    assert frac == 0
    for e in data.examples:
        prompt = tok.decode(e.input_ids)
        if e.task == "multikey":
            for key, value in re.findall(r"magic number for (\w+) is (\d+)", prompt):
                assert f"for {key} is {value}" not in text
        elif e.task == "passkey":
            assert f"pass key is {e.answer}" not in text
        else:
            assert f"= {e.answer}." not in text
    control, _ = overlap("validation")  # the same rows drawn from the evaluation's split would overlap a lot
    assert control > 0.02


def test_base_model_time_budget_fits_the_schedule(corpus, tmp_path):
    cfg = BaseModelConfig(vocab_size=400, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                          intermediate_size=64, seq_len=64, batch_size=2, steps=10_000, warmup_steps=8,
                          tokenizer_chars=20000, time_budget_s=1.0, calib_start=2, calib_end=6)
    info = build_base_model(corpus, tmp_path / "m", cfg, seed=0, device="cpu", progress=False, log=lambda *_: None)
    assert 6 < info["steps_planned"] < 10_000 and info["steps_done"] == info["steps_planned"]
    assert info["loss_curve"][-1][0] == info["steps_done"] - 1
    from dms.base_models import _lr_at

    # The steps timed lie in the warm-up, so replaying with steps=steps_planned gives the same learning rates.
    replay = dataclasses.replace(cfg, steps=info["steps_planned"], time_budget_s=None)
    assert [_lr_at(s, replay) for s in range(info["steps_planned"])] == \
        [_lr_at(s, cfg, info["steps_planned"]) for s in range(info["steps_planned"])]
    with pytest.raises(ValueError, match="time_budget_s"):
        BaseModelConfig(time_budget_s=0)
