"""scripts/generate.py on a retrofitted checkpoint: the default path and ``--fast`` (dms.graphs) agree."""
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dms
from dms_scripts.generate import main


def _checkpoint(tmp_path, tiny_base_factory):
    root = tmp_path / "base"
    root.mkdir()
    tiny_base_factory(root)
    model = AutoModelForCausalLM.from_pretrained(root / "model")
    dms.retrofit(model, dms.DMSConfig(window=2, attention_impl="eager"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "dms_retention.proj" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    out = tmp_path / "ckpt"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(root / "model").save_pretrained(out)
    return out


def test_fast_equals_default_and_flags(tmp_path, tiny_base_factory, capsys):
    ckpt = _checkpoint(tmp_path, tiny_base_factory)
    prompts = tmp_path / "p.txt"
    prompts.write_text("w1 w2 w3 w4 w5 w6 w7 w8 w9\nw5 w9 w12\n")
    outs = {}
    for mode in ([], ["--fast"], ["--cuda-graphs"]):
        assert main([str(ckpt), "--prompt-file", str(prompts), "--max-new-tokens", "12", "--json",
                     "--device", "cpu", "--cache", "paged"] + mode) == 0
        text = capsys.readouterr().out
        outs[" ".join(mode)] = json.loads(text.strip().splitlines()[-1]) if text.strip() else None
    for mode in ("--fast", "--cuda-graphs"):
        assert outs[mode]["outputs"] == outs[""]["outputs"], mode
        assert outs[mode]["kv"]["tokens_held"] == outs[""]["kv"]["tokens_held"], mode
    assert outs[""]["kv"]["memory_cr"] > 1.0  # the random retention heads evicted something
    assert main([str(ckpt), "--prompt", "w1", "--fast", "--num-beams", "2", "--device", "cpu"]) == 2
    assert "--fast" in capsys.readouterr().err
