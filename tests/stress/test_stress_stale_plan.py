"""Stale plans never re-patch a checkpoint: one folder saved over and over by a model that is patched (with a
changing plan), unpatched, fine-tuned, deep-copied and saved again. After every save, `hf_sparse_attn.from_pretrained`
of the folder gives exactly the state of the model that saved it: patched with its plan (and the same logits), or
unpatched, never a plan left behind by an earlier save. A file of the user's named like the plan is never touched."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
import transformers as T

from hf_sparse_attn import PLAN_FILE_NAME, PlanError, current_plan, from_pretrained, patch_model, unpatch_model
from tiny_checkpoint import tiny_llama

pytestmark = pytest.mark.stress

CYCLES = 24
VOCAB = 101


def _train_one_step(model, seed):
    model.train()
    ids = torch.randint(4, VOCAB, (1, 12), generator=torch.Generator().manual_seed(seed))
    model(ids, labels=ids).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-2 * p.grad
                p.grad = None
    model.eval()


def test_a_folder_saved_over_and_over_reloads_as_its_last_save(tmp_path):
    rng = random.Random(0)
    folder = tmp_path / "ckpt"
    model = tiny_llama(VOCAB)
    ids = torch.randint(4, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    for cycle in range(CYCLES):
        action = rng.choice(["patch", "unpatch", "train", "copy"])
        if action == "patch":
            layers = sorted(rng.sample(range(3), rng.randint(1, 3)))
            patch_model(model, method="exact", layers=layers)
        elif action == "unpatch":
            unpatch_model(model)
        elif action == "train":
            _train_one_step(model, cycle)
        else:
            model = copy.deepcopy(model)  # the copy's hook is bound to the copy
        model.save_pretrained(folder)
        expected = current_plan(model)
        reloaded = from_pretrained(folder, auto_class=T.AutoModelForCausalLM)
        got = current_plan(reloaded)
        label = f"cycle {cycle} ({action})"
        if expected is None:
            assert got is None and not (folder / PLAN_FILE_NAME).exists(), label
        else:
            assert got is not None and got.patched_layers == expected.patched_layers, label
            with torch.no_grad():
                assert torch.equal(reloaded(ids).logits, model(ids).logits), label


def test_a_users_file_named_like_the_plan_survives_every_save(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    mine = folder / PLAN_FILE_NAME
    mine.write_text(json.dumps({"note": "mine"}), encoding="utf-8")
    model = tiny_llama(VOCAB)
    for cycle in range(6):
        if cycle % 2 == 0:
            patch_model(model, method="exact", layers=[cycle % 3])
            with pytest.raises(PlanError, match="not a plan written by hf_sparse_attn"):
                model.save_pretrained(folder)
        else:
            unpatch_model(model)
            model.save_pretrained(folder)  # unpatched: saved, the file left alone
        assert json.loads(mine.read_text(encoding="utf-8")) == {"note": "mine"}, cycle
