"""The offline long-context suite end to end on the real SmolLM2-135M, kept small for CI: the needle tasks
at 1k tokens, one sample each, through `hf-sparse-attn longbench --suite offline`. The full grid (2k-8k, 0-30 layers)
is scripts/offline_suite.py."""

from __future__ import annotations

import json

from hf_sparse_attn.cli import main

NEEDLES = "needle_start,needle_middle,needle_end"
COMMON = ["longbench", "--model", "smollm2", "--suite", "offline", "--contexts", "1", "--max-samples", "1",
          "--tasks", NEEDLES, "--max-new-tokens", "24", "--no-progress"]


def _predictions(out_dir) -> dict[str, dict]:
    records = {}
    for kind in NEEDLES.split(","):
        with open(out_dir / f"{kind}_1k.jsonl", encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                records[record["_id"]] = record
    return records


def test_offline_suite_on_real_smollm2_exact_and_patched_in_its_exact_regime(tmp_path, capsys):
    assert main(COMMON + ["--out", str(tmp_path / "exact")]) == 0
    exact = _predictions(tmp_path / "exact")
    assert len(exact) == 3
    # the unpatched model finds every needle at 1k (the suite is answerable by this model)
    assert all(any(a in r["pred"] for a in r["answers"]) for r in exact.values()), exact

    # sparse_hyper on all 30 layers with one sorted block covering every off-diagonal quadrant of the causal
    # recursion (block_size >= N / 2) and no sampling: the method runs on every prefill yet must be exact
    assert main(COMMON + ["--out", str(tmp_path / "patched"), "--method", "sparse_hyper", "--layers", "all",
                          "--param", "block_size=1024", "--param", "min_seq_len=256",
                          "--param", "causal_min_seq_len=256"]) == 0
    patched = _predictions(tmp_path / "patched")
    summary = json.loads((tmp_path / "patched" / "summary.json").read_text())
    layers = summary["plan"]["layers"]
    assert len(layers) == 30 and all(layer["method"] == "sparse_hyper" for layer in layers)
    assert all(layer["served"] == 3 for layer in layers)  # one prefill per sample, none below the threshold
    assert summary["meta"]["fallbacks_this_invocation"] == {}  # every call served: prefill by the method,
    assert all(layer["decode_served"] > 0 for layer in layers)  # generation steps by the exact decode method
    assert {i: r["pred"] for i, r in patched.items()} == {i: r["pred"] for i, r in exact.items()}
    result = json.loads((tmp_path / "patched" / "result.json").read_text())
    assert result == json.loads((tmp_path / "exact" / "result.json").read_text())
    capsys.readouterr()
