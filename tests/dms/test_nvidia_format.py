"""NVIDIA's released DMS checkpoint format loads through ``dms.load`` and generates with the paged cache.

A synthetic checkpoint in that format: a tiny Qwen3 saved with ``save_pretrained``, then flat ``dms_*``
fields added to config.json and ``model.layers.{i}.self_attn.dms_proj_alpha.{weight,bias}`` tensors
(``[Hkv, hidden]`` / ``[Hkv]``, reading the attention input ``input_layernorm(x)``) added to the safetensors.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import dms

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
SCALE, OFFSET, WINDOW = 100.0, 5.0, 2


@pytest.fixture
def nvidia_checkpoint(tmp_path, make_tiny_model):
    hd = 64 if CUDA else 16
    model = make_tiny_model("qwen3", kv_heads=2, heads=4, hidden=4 * hd, head_dim=hd, layers=2)
    model.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(dms_window_size=WINDOW, dms_alpha_scale=SCALE, dms_initial_alpha_offset=OFFSET,
               dms_separate_alpha=True, dms_alpha_per="head")
    cfg_path.write_text(json.dumps(cfg))
    wfile = tmp_path / "model.safetensors"
    tensors = load_file(wfile)
    g = torch.Generator().manual_seed(7)
    alpha = {}
    for i in range(cfg["num_hidden_layers"]):
        w = torch.randn(cfg["num_key_value_heads"], cfg["hidden_size"], generator=g) * 0.02
        b = torch.full((cfg["num_key_value_heads"],), 0.04)  # ~half the logits above zero
        tensors[f"model.layers.{i}.self_attn.dms_proj_alpha.weight"] = w
        tensors[f"model.layers.{i}.self_attn.dms_proj_alpha.bias"] = b
        alpha[i] = (w, b)
    save_file(tensors, str(wfile), metadata={"format": "pt"})
    return str(tmp_path), alpha


def test_config_and_weights_parsed(nvidia_checkpoint):
    path, alpha = nvidia_checkpoint
    model, _ = dms.load(path, device=DEV, cache="paged")
    cfg = dms.dms_state(model).config
    assert (cfg.window, cfg.alpha_scale, cfg.alpha_offset, cfg.retention, cfg.granularity) == (
        WINDOW, SCALE, OFFSET, "adapter", "head")
    for i, layer in enumerate(model.model.layers):
        head = layer.self_attn.dms_retention
        torch.testing.assert_close(head.proj.weight.cpu(), alpha[i][0])
        torch.testing.assert_close(head.norm_weight.cpu(), layer.input_layernorm.weight.float().cpu())


def test_loaded_decisions_equal_intended(nvidia_checkpoint):
    """Decisions of the loaded model == NVIDIA's definition computed from the raw tensors:
    evict key t iff ``scale * dms_proj_alpha(input_layernorm(x_{t+1})) - offset > 0``."""
    path, alpha = nvidia_checkpoint
    model, _ = dms.load(path, device=DEV)
    layers = model.model.layers
    captured = {}
    hooks = [l.register_forward_pre_hook(lambda m, a, kw, i=i: captured.__setitem__(i, (a[0] if a else kw["hidden_states"]).detach()),
                                         with_kwargs=True) for i, l in enumerate(layers)]
    ids = torch.randint(3, 97, (2, 24), device=DEV)
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    records = dms.dms_state(model).records
    n_evict = 0
    for i, layer in enumerate(layers):
        x = captured[i].float()
        ln = layer.input_layernorm
        xn = F.rms_norm(x, (x.shape[-1],), ln.weight.float(), ln.variance_epsilon)
        w, b = alpha[i]
        logit = SCALE * F.linear(xn, w.to(DEV), b.to(DEV)) - OFFSET  # [B, T, Hkv], decides about key t-1
        intended = torch.zeros_like(logit, dtype=torch.bool)
        intended[:, :-1] = logit[:, 1:] > 0
        assert torch.equal(records[i]["evict_mask"], intended)
        n_evict += int(intended.sum())
    assert 0 < n_evict < intended.numel() * len(layers)  # the test is not vacuous


@pytest.mark.parametrize("cache", ["paged", "reference"])
def test_generate_after_load(nvidia_checkpoint, cache):
    path, _ = nvidia_checkpoint
    model, _ = dms.load(path, device=DEV, cache=cache)
    ids = torch.randint(3, 97, (2, 12), device=DEV)
    am = torch.ones_like(ids)
    am[0, :3] = 0
    out = model.generate(ids, attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    full = torch.cat([am, torch.ones_like(out.sequences[:, 12:])], 1)
    with torch.no_grad():
        tf = model(out.sequences, attention_mask=full).logits
    torch.testing.assert_close(torch.stack(out.logits, 1), tf[:, 11:-1], atol=2e-4 if CUDA else 1e-5, rtol=0)


def test_bad_cache_kind(nvidia_checkpoint):
    with pytest.raises(ValueError, match="cache must be one of"):
        dms.load(nvidia_checkpoint[0], cache="dense")
