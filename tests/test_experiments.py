"""`hf-sparse-attn bench run CONFIG`: experiment configs (parsing, errors, argv), dry runs, a real tiny model
grid run whole and in two shards into one directory, and `--report-only` rebuilding committed reports unchanged."""

from __future__ import annotations

import glob
import os
import shutil
import sys

import pytest

from hf_sparse_attn.cli import main
from hf_sparse_attn.eval.bench.grid import Cell, build_grid, shard_cells
from hf_sparse_attn.eval.bench.results import latest_cells, read_results
from hf_sparse_attn.commands.experiments import ConfigError, experiment_commands, load_config, run_argv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODEL_CONFIG = """
[experiment]
name = "{name}"
question = "a tiny grid"
kind = "model"

[[run]]
tokens = [48]
articles = 2
methods = ["sparse_hyper"]
layers = [0, 1, 2]
selections = ["weight_norm", "last"]
no_profile = true
no_progress = true
calibration_tokens = 32
model = "{model}"
method_param = ["sparse_hyper.block_size=16", "sparse_hyper.min_seq_len=16", "sparse_hyper.causal_min_seq_len=16",
                "sparse_hyper.num_sink_tokens=4"]

[[goal]]
text = "sparse_hyper on 1 layer within +1000% of exact"
method = "sparse_hyper"
layers = 1
at_most = 1000.0
"""


def _write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return str(path)


def _config(tmp_path, name="tiny", model="unused", **replace) -> str:
    text = MODEL_CONFIG.format(name=name, model=model)
    for old, new in replace.items():
        text = text.replace(old, new)
    return _write(tmp_path, name, text)


# ---- parsing and errors ---------------------------------------------------------------------------------

def test_run_argv_follows_the_commands_options():
    argv = run_argv("model", {"tokens": [8192], "articles": 20, "methods": ["local", "hyper"], "no_profile": True,
                              "rope_scaling": "yarn", "method_param": ["local.window=1024", "hyper.block_size=128"],
                              "concat_articles": False})
    assert argv == ["--tokens", "8192", "--articles", "20", "--methods", "local", "hyper", "--no-profile",
                    "--rope-scaling", "yarn", "--method-param", "local.window=1024", "--method-param", "hyper.block_size=128"]
    assert run_argv("kernel", {"max_n": ["kmv=1024", "exact=2048"], "ns": [1024]}) == [
        "--max-n", "kmv=1024", "--max-n", "exact=2048", "--ns", "1024"]
    assert run_argv("script", {"tokens": 4096, "sinks": [0, 64], "redo": True, "quick": False}) == [
        "--tokens", "4096", "--sinks", "0", "64", "--redo"]


@pytest.mark.parametrize("edit,message", [
    ({'kind = "model"': 'kind = "modle"'}, "unknown kind 'modle'"),
    ({'question = "a tiny grid"': 'question = "a tiny grid"\nstage = "2a"'}, r"unknown key\(s\) \['stage'\] in \[experiment\]"),
    ({"[[run]]": "[[runs]]"}, r"unknown table\(s\) \['runs'\]"),
    ({"articles = 2": "artcles = 2"}, "has no option --artcles.*articles, calibration_tokens"),
    ({"articles = 2": "out = \"x\""}, "set by the runner"),
    ({"no_profile = true": "no_profile = 1"}, "is a flag"),
    ({"articles = 2": "articles = [2, 3]"}, "takes one value"),
    ({"at_most = 1000.0": "at_mots = 1000.0"}, "unknown key"),
])
def test_config_errors_say_what_is_wrong(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_config(tmp_path, **edit))


def test_config_without_runs_or_with_another_name_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"no \[\[run\]\]"):
        load_config(_write(tmp_path, "x", '[experiment]\nname = "x"\nquestion = "q"\nkind = "model"\n'))
    with pytest.raises(ConfigError, match="differs from the file's name"):
        load_config(_write(tmp_path, "y", MODEL_CONFIG.format(name="x", model="m")))
    with pytest.raises(ConfigError, match="needs script"):
        load_config(_write(tmp_path, "s", '[experiment]\nname = "s"\nquestion = "q"\nkind = "script"\n[[run]]\n'))


def test_every_committed_config_parses():
    paths = sorted(glob.glob(os.path.join(REPO, "eval", "experiments", "*.toml")))
    assert paths
    for path in paths:
        config = load_config(path)
        exp = config["experiment"]
        if exp["kind"] == "script":
            assert os.path.exists(os.path.join(REPO, exp["script"])), exp["script"]
        if exp.get("report_script"):
            assert os.path.exists(os.path.join(REPO, exp["report_script"])), exp["report_script"]


# ---- commands, shards, dry run --------------------------------------------------------------------------

def test_commands_add_out_experiment_shard_and_report_only(tmp_path):
    path = _config(tmp_path)
    (run,) = experiment_commands(path, shard="1/2")
    assert run[:3] == ["hf-sparse-attn", "bench", "model"]
    assert run[-6:] == ["--experiment", path, "--out", os.path.join("eval", "results", "tiny"), "--shard", "1/2"]
    (rebuild,) = experiment_commands(path, out="o", report_only=True)
    assert rebuild[-3:] == ["--out", "o", "--report-only"]
    with pytest.raises(ConfigError, match="without --shard"):
        experiment_commands(path, shard="0/2", report_only=True)
    with pytest.raises(ConfigError, match="0 <= I < N"):
        experiment_commands(path, shard="2/2")
    kernel = _write(tmp_path, "k", '[experiment]\nname = "k"\nquestion = "q"\nkind = "kernel"\n[[run]]\nns = [1024]\n')
    with pytest.raises(ConfigError, match="kind 'kernel' cannot shard"):
        experiment_commands(kernel, shard="0/2")
    script = '[experiment]\nname = "s"\nquestion = "q"\nkind = "script"\nscript = "scripts/x.py"\n{}[[run]]\nn = 3\n'
    with pytest.raises(ConfigError, match="does not declare that it shards"):
        experiment_commands(_write(tmp_path, "s", script.format("")), shard="0/2")
    (command,) = experiment_commands(_write(tmp_path, "s", script.format("shardable = true\n")), shard="0/2")
    assert command[1:] == ["scripts/x.py", "--n", "3", "--out", os.path.join("eval", "results", "s"), "--shard", "0/2"]


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", "run", _config(tmp_path), "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("hf-sparse-attn bench model --tokens 48 --articles 2 --methods sparse_hyper")
    assert "--method-param sparse_hyper.block_size=16 --method-param" in printed and not out.exists()


def test_bad_config_through_the_cli_is_one_error_line(tmp_path, capsys):
    assert main(["bench", "run", _config(tmp_path, **{"articles = 2": "artcles = 2"})]) == 2
    err = capsys.readouterr().err
    assert "bench run: error:" in err and "--artcles" in err


def test_shard_cells_splits_patched_cells_and_keeps_every_baseline():
    cells = build_grid(["sparse_hyper"], [64, 128], [0, 1, 2], ["weight_norm", "last"])
    shards = [shard_cells(cells, i, 3) for i in range(3)]
    patched = [c.key for c in cells if not c.is_baseline]
    assert sorted(k for s in shards for k in (c.key for c in s if not c.is_baseline)) == sorted(patched)
    for s in shards:
        assert [c for c in s if c.is_baseline] == [Cell("exact", 64, 0, "none"), Cell("exact", 128, 0, "none")]
    assert [c.key for c in shards[1] if not c.is_baseline] == patched[1::3]
    with pytest.raises(ValueError, match="0 <= i < n"):
        shard_cells(cells, 3, 3)


# ---- a real tiny run --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from longbench_tiny import tiny_llama

    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(str(path))
    return str(path)


def _cells(out) -> dict:
    return latest_cells(read_results(str(out)))


def test_two_shards_make_the_cells_of_one_whole_run(tmp_path, tiny_llama_dir, capsys):
    path = _config(tmp_path, model=tiny_llama_dir)
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert main(["bench", "run", path, "--out", str(whole)]) == 0
    assert main(["bench", "run", path, "--out", str(sharded), "--shard", "0/2"]) == 0
    first = _cells(sharded)
    assert main(["bench", "run", path, "--out", str(sharded), "--shard", "1/2"]) == 0
    assert sorted(os.path.basename(p) for p in glob.glob(str(sharded / "*.jsonl"))) == [
        "results.shard-0-of-2.jsonl", "results.shard-1-of-2.jsonl"]
    expected, merged = _cells(whole), _cells(sharded)
    assert len(expected) == 5 and 1 < len(first) < 5  # baseline + 4 patched cells; shard 0 ran 2 of them
    assert sorted(merged) == sorted(expected)
    for key, cell in expected.items():
        assert merged[key]["nll_sum"] == pytest.approx(cell["nll_sum"], rel=1e-6), key
        assert merged[key]["tokens_scored"] == cell["tokens_scored"]
    # each shard timed its own baseline: one cell record, one re-run in the other shard's file
    reruns = [r for r in read_results(str(sharded)) if r.get("kind") == "baseline_rerun"]
    assert len(reruns) == 1
    # the report step reads every shard's file, and states the config's goal
    capsys.readouterr()
    assert main(["bench", "run", path, "--out", str(sharded), "--report-only"]) == 0
    md = (sharded / "results.md").read_text()
    assert "sparse_hyper on 1 layer within +1000% of exact" in md and f"Experiment: `{path}`" in md
    assert "\nGrid: tokens" in md  # one [[run]]: the grid line is the whole experiment's
    rows = [line for line in md.splitlines() if line.startswith("| 48 | sparse_hyper |")]
    assert len(rows) == 4
    # a rerun of a finished shard, or an unsharded rerun, has nothing to do: no new records
    before = len(read_results(str(sharded)))
    assert main(["bench", "run", path, "--out", str(sharded), "--shard", "1/2"]) == 0
    assert main(["bench", "run", path, "--out", str(sharded)]) == 0
    assert len(read_results(str(sharded))) == before and not (sharded / "results.jsonl").exists()


# ---- the index and the README link every result to its config and its report -----------------------------

def _table_rows(path: str, header: str) -> list[str]:
    lines = open(path, encoding="utf-8").read().split(header, 1)[1].splitlines()
    rows = []
    for line in lines[1:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def test_readme_results_rows_link_an_existing_config_and_report():
    import re

    rows = _table_rows(os.path.join(REPO, "README.md"), "| what | result | config, report |")
    assert 1 <= len(rows) - 1 <= 12  # the separator row, then at most 12 results
    for row in rows[1:]:
        links = re.findall(r"\]\(([^)]+)\)", row)
        assert any(l.startswith("eval/experiments/") and l.endswith(".toml") for l in links), row
        assert any(l.startswith("eval/results/") and l.endswith(".md") for l in links), row
        for link in links:
            path, _, anchor = link.partition("#")
            assert os.path.exists(os.path.join(REPO, path)), link
            if anchor:  # a heading of that markdown file, as GitHub makes anchors of headings
                headings = re.findall(r"^#+ (.+)$", open(os.path.join(REPO, path), encoding="utf-8").read(), re.M)
                assert anchor in {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}, link


def test_results_index_has_one_row_per_experiment_with_its_config():
    import re

    index = os.path.join(REPO, "eval", "results", "README.md")
    rows = _table_rows(index, "| directory | question | config | headline |")[1:]
    named = set()
    for row in rows:
        links = re.findall(r"\]\(([^)]+)\)", row)
        config = next(l for l in links if l.endswith(".toml"))
        name = os.path.splitext(os.path.basename(config))[0]
        assert name not in named, name
        named.add(name)
        assert load_config(os.path.normpath(os.path.join(os.path.dirname(index), config)))["experiment"]["name"] == name
        for link in links:
            assert os.path.exists(os.path.normpath(os.path.join(os.path.dirname(index), link))), link


# ---- --report-only rebuilds a committed report byte for byte ---------------------------------------------------

# A representative few (each rebuild takes seconds): a script experiment and a `bench kernel` one, whose reports
# state the run's date and machine, not the rebuild's. Experiment -> the files its rebuild writes (from the rest).
REBUILT = {"calibrate_default_run": ["results.md"],
           "kernels_kmv_blocks": ["results.md", "time_vs_n_random.png", "time_vs_n_smollm2.png"]}


@pytest.mark.parametrize("name", sorted(REBUILT))
def test_report_only_rebuilds_the_committed_report(tmp_path, monkeypatch, name):
    import torch

    # a scratch repository root: the configs and scripts linked, the experiment's records copied without the files
    # the rebuild writes
    results = tmp_path / "eval" / "results" / name
    os.makedirs(results.parent)
    os.symlink(os.path.join(REPO, "eval", "experiments"), tmp_path / "eval" / "experiments")
    os.symlink(os.path.join(REPO, "scripts"), tmp_path / "scripts")
    committed = os.path.join(REPO, "eval", "results", name)
    shutil.copytree(committed, results)
    for file in REBUILT[name]:
        os.remove(results / file)
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "run", os.path.join("eval", "experiments", f"{name}.toml"), "--report-only"]
    monkeypatch.setattr(sys, "argv", ["hf-sparse-attn", *argv])  # the report names the command that wrote it
    threads = torch.get_num_threads()
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # the config's --threads applies to this process
    for file in REBUILT[name]:
        with open(os.path.join(committed, file), "rb") as a:
            assert a.read() == (results / file).read_bytes(), f"{name}/{file}: the rebuild differs from the committed file"
