"""Installation: our kernels folder must not shadow Hugging Face's `kernels` distribution."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, cwd) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_kernels_import_name_is_unique(tmp_path):
    out = _run(
        "import importlib.util, importlib.metadata as md, dms_kernels, dms_kernels.train_attention as t\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print('KERNELS', None if spec is None else spec.origin)\n"
        "print('OURS', dms_kernels.__file__)\n"
        "files = md.files('dms-retrofit') or []\n"
        "print('TOP', sorted({f.parts[0] for f in files if f.suffix == '.py' and len(f.parts) > 1}))\n",
        cwd=tmp_path)
    lines = dict(l.split(" ", 1) for l in out.strip().splitlines())
    assert lines["OURS"].endswith(os.path.join("kernels", "__init__.py"))
    # Installed, nothing of ours answers to the name `kernels` (HF's package, if installed, keeps it).
    assert lines["KERNELS"] == "None" or str(REPO) not in lines["KERNELS"]
    assert "'kernels'" not in lines["TOP"]


def test_transformers_and_retrofit_work_with_ours_installed():
    # Run from the repository root, where the folder `kernels/` is right beside the interpreter's cwd.
    out = _run(
        "import transformers, torch, dms\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "from transformers import LlamaConfig, AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,"
        " num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))\n"
        "dms.retrofit(m)\n"
        "print(is_kernels_available(), m(torch.randint(0, 50, (1, 8))).logits.shape)\n",
        cwd=REPO)
    hub_kernels_ok, shape = out.strip().split(" ", 1)
    assert shape == "torch.Size([1, 8, 50])"
    # transformers must not mistake our folder for the hub `kernels` package (it checks the distribution)
    import importlib.metadata as md

    try:
        md.version("kernels")
        installed = True
    except md.PackageNotFoundError:
        installed = False
    assert hub_kernels_ok == str(installed) or installed


def test_console_entry_points_resolve():
    import importlib.metadata as md

    eps = {e.name: e for e in md.entry_points(group="console_scripts") if e.name.startswith("dms-")}
    assert {"dms-retrofit", "dms-generate"} <= set(eps)
    for e in eps.values():
        assert callable(e.load())
