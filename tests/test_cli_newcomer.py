"""The command line as a newcomer meets it (issue 32, items 11, 12, 14, 16), run as the real command in a
subprocess:

- 11: every command checks its arguments before loading anything and fails with status 2 (``demo --method
  sparse-hyper`` used to load, rank, run ~50 s and exit 0 after "not registered ... skipping");
- 12: ``--help``, argument errors and ``longbench-score`` import neither torch nor transformers (the package face
  and every command module are light), and ``import hf_sparse_attn`` still registers its attention implementation
  with transformers once transformers' modeling code loads;
- 14: a path that does not exist is an error at once, a near-miss of an offline model name gets "did you mean";
- 16: a typo'd option prints the sub-command's usage; the rank table's order is what the help says; the demo's
  timed prefills show progress; ``plan show`` / ``plan diff``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from hf_sparse_attn.cli import COMMANDS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "transformers")

# Runs the command in-process in a fresh interpreter and reports, on its last line, the exit status and which heavy
# libraries were imported by then.
_PROBE = r"""
import json, sys
from hf_sparse_attn.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as err:
    rc = err.code
sys.stdout.flush()
print("\nPROBE " + json.dumps({"rc": rc, "heavy": [m for m in ("torch", "transformers") if m in sys.modules]}))
"""


def cli_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def probe(*argv: str, cwd: str = REPO) -> tuple[int, list[str], str, str]:
    """(exit status, heavy modules loaded, stdout, stderr) of `hf-sparse-attn ARGV` in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", _PROBE, *argv], cwd=cwd, env=cli_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "\nPROBE " in done.stdout, done.stderr[-3000:]
    out, _, result = done.stdout.rpartition("\nPROBE ")
    result = json.loads(result)
    return result["rc"], result["heavy"], out, done.stderr


def cli(*argv: str, cwd: str = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    """The real command: `python -m hf_sparse_attn.cli ARGV`."""
    return subprocess.run([sys.executable, "-m", "hf_sparse_attn.cli", *argv], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


# hf_sparse_attn/commands/longbench.py belongs to another change: its --model needs type=commands.models.model_name
# and its check_arguments a call of commands.models.check_local_or_hub(args.data, "--data", ...).

CHOSEN = [name for name in COMMANDS if name != "lm-eval"]  # lm-eval's arguments are lm-eval's own


# ------------------------------------------------------------------------------------------------ item 12
def test_top_level_help_loads_neither_torch_nor_transformers():
    rc, heavy, out, _ = probe("--help")
    assert rc == 0 and "rank" in out and "plan" in out
    assert heavy == [], f"`hf-sparse-attn --help` imported {heavy}"


@pytest.mark.parametrize("command", CHOSEN)
def test_help_and_a_typod_option_of_every_command_load_nothing_heavy(command):
    rc, heavy, out, _ = probe(command, "--help")
    assert rc == 0 and f"usage: hf-sparse-attn {command}" in out
    assert heavy == [], f"`hf-sparse-attn {command} --help` imported {heavy}"
    rc, heavy, _, err = probe(command, "--no-such-option")
    assert rc == 2
    # item 16: the sub-command's usage, not the top-level one
    assert err.startswith(f"usage: hf-sparse-attn {command}"), err
    assert "unrecognized arguments: --no-such-option" in err or "required" in err, err
    assert heavy == [], f"an argument error of `{command}` imported {heavy}"


def test_longbench_score_loads_neither_torch_nor_transformers(tmp_path):
    rows = [{"pred": "Paris", "answers": ["Paris"], "all_classes": None, "length": 10, "_id": "h1"}]
    (tmp_path / "hotpotqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, heavy, _, err = probe("longbench-score", str(tmp_path))
    assert rc == 0, err
    assert json.loads((tmp_path / "result.json").read_text()) == {"hotpotqa": 100.0}
    assert heavy == [], f"longbench-score imported {heavy}"


_IMPORT_THEN_MODEL = r"""
import sys
{first}
assert "torch" not in sys.modules or "{first}" != "import hf_sparse_attn", "import hf_sparse_attn loaded torch"
{second}
import hf_sparse_attn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from hf_sparse_attn.patches.masks import compact_mask
assert "hf_sparse_attn" in ALL_ATTENTION_FUNCTIONS.valid_keys()
assert ALL_MASK_ATTENTION_FUNCTIONS["hf_sparse_attn"] is compact_mask
config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
model = LlamaForCausalLM._from_config(config, attn_implementation="hf_sparse_attn")
assert model.config._attn_implementation == "hf_sparse_attn"
loader = sys.modules["transformers.modeling_utils"].__spec__.loader
assert type(loader).__name__ == "SourceFileLoader", loader  # the hook leaves nothing on the module
assert not [f for f in sys.meta_path if type(f).__name__ == "_RegisterAfterImport"]  # and removes itself
print("OK")
"""


@pytest.mark.parametrize("first, second", [
    ("import hf_sparse_attn", "import transformers"),  # the hook: registered when modeling_utils loads
    ("import hf_sparse_attn", "import transformers.masking_utils"),  # masking first: waits for modeling_utils
    ("import hf_sparse_attn", "from transformers import PreTrainedModel"),  # modeling first: imports masking_utils
    ("import transformers.models.llama.modeling_llama", "pass"),  # transformers first: registered at import
])
def test_import_registers_the_attention_implementation_whatever_the_order(first, second):
    code = _IMPORT_THEN_MODEL.format(first=first, second=second)
    done = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "OK", done.stderr[-3000:]


def test_the_package_face_is_lazy_and_complete():
    code = ("import sys, hf_sparse_attn as h; assert 'torch' not in sys.modules; "
            "names = [n for n in h.__all__ if n != 'recommended' or __import__('importlib.util').util.find_spec("
            "'hf_sparse_attn.recommend')]; [getattr(h, n) for n in names]; "
            "assert h.patching.patch_model is h.patch_model; print(sorted(set(h.__all__) - set(dir(h))))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"
    import hf_sparse_attn

    assert "recommended" in hf_sparse_attn.__all__
    assert hf_sparse_attn._LAZY_EXPORTS["recommended"] == "hf_sparse_attn.recommend"


def test_names_known_without_torch_match_the_registry():
    from hf_sparse_attn import list_methods
    from hf_sparse_attn.commands import arguments, rank
    from hf_sparse_attn.selection import NORMS, SELECT_PRESETS

    assert sorted(arguments.BUILTIN_METHODS) == sorted(list_methods())
    assert arguments.SELECT_PRESETS == SELECT_PRESETS
    assert rank.NORMS == NORMS


# ------------------------------------------------------------------------------------------------ item 11
def test_demo_with_a_typod_method_fails_at_once(tmp_path):
    rc, heavy, out, err = probe("demo", "--method", "sparse-hyper", cwd=str(tmp_path))
    assert rc == 2 and "did you mean sparse_hyper?" in err, err
    assert "not registered" not in out and heavy == []


@pytest.mark.parametrize("argv, expected", [
    (["demo", "--layers", "15"], "--layers is a fraction of the layers in (0, 1]"),
    (["demo", "--plan-out", "/no/such/dir/plan.json"], "--plan-out /no/such/dir/plan.json: the directory"),
    (["demo", "--select", "weight-norm"], "did you mean weight_norm?"),
    (["head-tail", "--model", "minilm", "--text", "{tmp}/missing.txt", "--out", "{tmp}/o"], "no such text file"),
    (["sparsity", "--model", "minilm", "--corpus", "wikipeda", "--out", "{tmp}/o"], "did you mean wikipedia?"),
    (["calibrate", "--model", "smolm2", "--text", "t.txt", "--out", "p.json"], "did you mean smollm2?"),
    (["bench", "model", "--model", "/no/such/model", "--out", "{tmp}/o"], "no such model directory"),
    (["longbench", "--model", "minlm", "--suite", "offline", "--out", "{tmp}/o"], "did you mean minilm?"),
    (["plan", "show", "{tmp}/missing.json"], "no such plan file"),
    (["plan", "diff", "{tmp}/a.json", "{tmp}/b.json"], "no such plan file"),
])
def test_every_command_checks_its_arguments_before_loading_anything(tmp_path, argv, expected):
    argv = [a.format(tmp=tmp_path) for a in argv]
    rc, heavy, _, err = probe(*argv, cwd=str(tmp_path))
    assert rc == 2 and expected in err, err
    assert "Traceback" not in err
    assert heavy == [], f"{argv} imported {heavy} before refusing its arguments"


# ------------------------------------------------------------------------------------------------ item 14
@pytest.mark.parametrize("name, expected", [
    ("/tmp/no/such/model", "/tmp/no/such/model: no such model directory"),
    ("./no_such_model", "no such model directory"),
    ("smolm2", "unknown model 'smolm2': did you mean smollm2?"),
    ("SmolLM-2", "did you mean smollm2?"),
])
def test_rank_a_missing_path_or_a_near_miss_is_an_immediate_error(name, expected):
    rc, heavy, _, err = probe("rank", name)
    assert rc == 2 and expected in err, err
    assert "Repo id must be" not in err and heavy == []


def test_model_names_that_may_be_hub_ids_or_paths_pass(tmp_path):
    from hf_sparse_attn.commands.models import check_local_or_hub, check_model_name

    for name in ("smollm2", "SmolLM2-135M", "minilm", "gpt2", "Qwen/Qwen2-0.5B", str(tmp_path)):
        assert check_model_name(name) == name
    assert check_local_or_hub(str(tmp_path), "--data", "a directory") == str(tmp_path)
    assert check_local_or_hub("THUDM/LongBench", "--data", "a directory") == "THUDM/LongBench"
    for bad in ("nosuchdir", "a/b/c", "/no/such/dir", "./data"):
        with pytest.raises(ValueError, match="no such file or directory"):
            check_local_or_hub(bad, "--data", "a directory")


def test_longbench_data_that_does_not_exist_is_an_immediate_error(tmp_path):
    rc, _, _, err = probe("longbench", "--model", "smollm2", "--data", "nosuchdir", "--tasks", "hotpotqa",
                          "--out", str(tmp_path / "o"), cwd=str(tmp_path))
    assert rc == 2 and "nosuchdir: no such file or directory" in err, err


# ------------------------------------------------------------------------------------------------ item 16
def test_a_typod_option_names_the_option_meant_with_the_commands_usage():
    rc, _, _, err = probe("rank", "smollm2", "--nrom", "frobenius")
    assert rc == 2
    assert err.startswith("usage: hf-sparse-attn rank") and "--nrom: did you mean --norm?" in err, err
    rc, _, _, err = probe("plan", "show", "plan.json", "--nope")  # a nested command: its own usage too
    assert rc == 2 and err.startswith("usage: hf-sparse-attn plan show") and "did you mean" not in err, err
    rc, _, _, err = probe("rnak", "smollm2")
    assert rc == 2 and "unknown command 'rnak': did you mean rank?" in err, err


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(path)
    return str(path)


def test_rank_table_order_is_what_the_help_says(tiny_llama):
    done = cli("rank", tiny_llama)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.strip()[:1].isdigit()]
    layers = [int(r[0]) for r in rows]
    ranks = [int(r[2]) for r in rows]
    norms = [float(r[1]) for r in rows]
    assert layers == [0, 1, 2, 3]  # the table is in layer order ...
    assert [layers[ranks.index(k)] for k in range(4)] == sorted(layers, key=lambda i: -norms[i])  # rank 0 = largest R
    helps = cli("--help").stdout + cli("rank", "--help").stdout
    assert "largest first" not in cli("--help").stdout  # it used to say so of this table
    assert "layer order" in helps and "rank 0 = largest R" in helps
    assert "layer order" in done.stdout


def test_demo_progress_bar_counts_the_decoder_layers_of_a_forward(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    from hf_sparse_attn.commands import demo

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        reference = model(ids).logits
        with demo.layer_progress(model, "exact prefill") as bar:
            bar.fp = io.StringIO()  # tqdm writes here
            logits = model(ids).logits
            assert bar.n == 4
        model(ids[:, :8])  # the hooks are gone afterwards
    assert torch.equal(logits, reference)  # counting layers changes nothing they compute
    assert bar.n == 4 and not any(layer._forward_hooks for layer in demo.decoder_layers(model))


def _plans(tiny_llama, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from hf_sparse_attn import patch_model, unpatch_model

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    plan = patch_model(model, method="local", layers=0.5, window=16, num_sink_tokens=4, min_seq_len=8)
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 40)))  # counts: served and fallbacks
    plan.save(tmp_path / "a.json")
    text = str(plan)
    unpatch_model(model)
    return plan, text


def test_plan_show_prints_the_plan_and_its_counts(tiny_llama, tmp_path):
    plan, text = _plans(tiny_llama, tmp_path)
    done = cli("plan", "show", str(tmp_path / "a.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(text + "\n")  # as print(plan) prints it
    served = sum(layer.served for layer in plan.layers)
    fallbacks = sum(plan.fallback_counts().values())
    assert served + fallbacks > 0
    assert f"calls served by the method: {served} " in done.stdout
    assert f"fell back to exact attention: {fallbacks}" in done.stdout


def test_plan_diff_names_what_differs_and_exits_1(tiny_llama, tmp_path):
    plan, _ = _plans(tiny_llama, tmp_path)
    a = str(tmp_path / "a.json")
    same = json.loads((tmp_path / "a.json").read_text())
    same["created"] = "2000-01-01"
    same["layers"][0]["served"] += 7  # counts and dates do not change what runs
    (tmp_path / "same.json").write_text(json.dumps(same))
    done = cli("plan", "diff", a, str(tmp_path / "same.json"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the plans run the same" in done.stdout and "created" in done.stdout

    other = json.loads((tmp_path / "a.json").read_text())
    patched = [e for e in other["layers"] if e["method"]]
    unpatched = [e for e in other["layers"] if not e["method"]]
    patched[0]["params"]["window"] = 32
    patched[1]["method"] = "sparse_hyper"
    unpatched[0]["method"] = "exact"
    (tmp_path / "b.json").write_text(json.dumps(other))
    done = cli("plan", "diff", a, str(tmp_path / "b.json"))
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout
    assert f"layer {patched[0]['layer_idx']} (local): params window: 16 -> 32" in lines
    assert f"layer {patched[1]['layer_idx']}: method local -> sparse_hyper" in lines
    assert f"layer {unpatched[0]['layer_idx']}: method - -> exact" in lines
    assert "3 difference(s) in what runs" in lines
