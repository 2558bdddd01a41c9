"""scripts/generate.py on a retrofitted checkpoint: the default path and ``--fast`` (dms.graphs) agree."""
import json

from dms_scripts.generate import main


def test_fast_equals_default_and_flags(tmp_path, tiny_dms_checkpoint_factory, capsys):
    ckpt = tiny_dms_checkpoint_factory(tmp_path, window=2)
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
