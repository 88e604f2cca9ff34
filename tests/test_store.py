"""The crash-safe JSONL store shared by the model benchmark, LongBench predictions and the attention audits."""

from __future__ import annotations

import json

import pytest

from hf_sparse_attn.eval.store import (
    JsonlStore,
    append_record,
    read_records,
    repair_tail,
)


def test_reader_ignores_blank_lines_and_a_torn_last_line(tmp_path):
    path = str(tmp_path / "r.jsonl")
    assert read_records(path) == []
    append_record(path, {"i": 0})
    with open(path, "a") as f:
        f.write('\n{"i": 1}\n{"i": 2, "pay')  # a blank line, a record, then a write cut by a kill
    assert read_records(path) == [{"i": 0}, {"i": 1}]
    assert read_records(path, strict=True) == [{"i": 0}, {"i": 1}]


def test_a_corrupt_line_inside_the_file_is_skipped_or_named(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"i": 0}\nnot json\n{"i": 2}\n')
    assert read_records(str(path)) == [{"i": 0}, {"i": 2}]
    with pytest.raises(ValueError, match="line 2 is corrupt"):
        read_records(str(path), strict=True)


def test_append_after_a_torn_line_keeps_the_new_record(tmp_path):
    """Without repair (several writers may share the file), the torn text stays on its own line and the next record
    starts a new one instead of being glued to it and lost."""
    path = str(tmp_path / "r.jsonl")
    append_record(path, {"i": 0})
    with open(path, "a") as f:
        f.write('{"i": 1, "cut')
    append_record(path, {"i": 2})
    assert read_records(path) == [{"i": 0}, {"i": 2}]
    with open(path) as f:
        assert f.read().endswith('"cut\n{"i": 2}\n')


def test_store_cuts_a_torn_tail_on_open_and_appends_one_line_per_record(tmp_path):
    path = tmp_path / "sub" / "r.jsonl"
    path.parent.mkdir()
    path.write_text('{"i": 0}\n{"i": 1, "cu')
    with JsonlStore(str(path), ensure_ascii=False) as store:
        assert store.read() == [{"i": 0}]
        store.append({"i": 1, "text": "人民日报"})
    assert path.read_text(encoding="utf-8").splitlines() == ['{"i": 0}', '{"i": 1, "text": "人民日报"}']
    assert [json.loads(line)["i"] for line in path.read_text().splitlines()] == [0, 1]


def test_repair_tail_drops_undecodable_complete_last_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"i": 0}\n{"i": 1\n')
    repair_tail(str(path))
    assert path.read_text() == '{"i": 0}\n'
    repair_tail(str(tmp_path / "missing.jsonl"))
    assert not (tmp_path / "missing.jsonl").exists()
