"""Bad input to the entry scripts: a clear error naming the value and the fix, and nothing written."""
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem + "_cli", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


retrofit = _load(REPO / "train" / "retrofit.py")


@pytest.mark.parametrize("argv,message", [
    (["--cr", "0.5"], "--cr must be >= 1"),
    (["--cr", "abc"], "--cr must be a number"),
    (["--window", "-1"], "window must be >= 0"),
    (["--tau", "0"], "tau must be > 0"),
    (["--retention", "magic"], "retention must be one of"),
    (["--trainable", "everything"], "--trainable must be one of"),
    (["--retention", "q_neuron"], "q_neuron retention has no adapter parameters"),
])
def test_bad_flags_exit_2_and_write_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    rc = retrofit.main(argv + ["--output", str(out)])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unknown_recipe_key(tmp_path, capsys):
    r = tmp_path / "r.yaml"
    r.write_text("train:\n  stepz: 3\n")
    assert retrofit.main(["--recipe", str(r), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "stepz" in err and "known" in err


def test_window_at_or_beyond_seq_len_warns(tmp_path):
    with pytest.warns(UserWarning, match="nothing is ever evicted"):
        retrofit.build_config(retrofit.parse_args(["--window", "512", "--seq-len", "256", "--model", "x"]))


@pytest.fixture
def gpt2_dir(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(["a b c d e f g"] * 3, trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>")
    d = tmp_path / "gpt2"
    tok.save_pretrained(d)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tok))).save_pretrained(d)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": "a b c d e f g " * 20}) for _ in range(20)))
    return d, data


def test_unsupported_family_is_named(tmp_path, capsys, gpt2_dir):
    model_dir, data = gpt2_dir
    out = tmp_path / "run"
    rc = retrofit.main(["--model", str(model_dir), "--data", str(data), "--seq-len", "32", "--window", "4",
                        "--output", str(out), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "gpt2" in err and "llama, mistral, qwen2, qwen3" in err
    assert not out.exists()


def test_missing_text_field_and_empty_data(tmp_path, capsys, gpt2_dir):
    from dms.data import DataConfig, load_texts

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="text-field"):
        load_texts(DataConfig(source=str(bad)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError):
        load_texts(DataConfig(source=str(empty)))


def test_leave_skips_interpreter_teardown_only_in_multi_process_jobs(monkeypatch):
    """train/retrofit.py's exit: a rank of a multi-process job leaves through os._exit with the code (no teardown, where
    library destructors once aborted finished jobs); a single process exits normally through SystemExit."""
    calls = []

    class Exited(Exception):
        pass

    def fake_exit(code):
        calls.append(code)
        raise Exited

    monkeypatch.setattr(retrofit.os, "_exit", fake_exit)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Exited):
        retrofit.leave(0)
    assert calls == [0]
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit) as e:
        retrofit.leave(3)
    assert e.value.code == 3 and calls == [0]
