"""The polyak_next_chunk lm-eval task: items come from the val text, and lm-eval's accuracy equals a direct
computation with transformers on the same items."""

import json
import re

import numpy as np
import pytest
import torch

from bench.harness import ROOT
from eval.lm_eval_task.make import main as make_main
from eval.lm_eval_task.make import val_documents
from polyak.errors import UserError
from tests.test_evaluate import corpus, make_release


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    release = make_release(root / "model", root / "data")
    items = make_main(["--data-dir", str(root / "data"), "--out", str(root / "items.jsonl"), "--items", "8",
                       "--context-words", "10", "--answer-words", "4"])
    return release, root / "data", root / "items.jsonl", items


def test_items_are_val_text_with_distinct_choices(setup):
    _, data_dir, path, items = setup
    docs = corpus(12, seed=1)  # the val documents make_release wrote
    assert val_documents(data_dir) == docs
    assert [json.loads(line) for line in path.read_text().splitlines()] == items
    assert len(items) == 8
    for item in items:
        assert len(re.findall(r"\S+", item["context"])) == 10
        assert [len(c.split()) for c in item["choices"]] == [4] * 4
        assert len(set(item["choices"])) == 4
        assert any(item["context"] + " " + item["choices"][item["label"]] in doc for doc in docs)
    assert len({item["label"] for item in items}) > 1


def test_too_small_val_split_is_a_clear_error(setup, tmp_path):
    _, data_dir, _, _ = setup
    with pytest.raises(UserError, match="too small for items of 500 \\+ 4 words"):
        make_main(["--data-dir", str(data_dir), "--out", str(tmp_path / "x.jsonl"), "--context-words", "500",
                   "--answer-words", "4"])
    with pytest.raises(UserError, match="is not a prepared data folder \\(no meta.json\\)"):
        make_main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "x.jsonl")])


def test_lm_eval_accuracy_equals_transformers(setup):
    lm_eval = pytest.importorskip("lm_eval")  # lm-eval and accelerate, from requirements.txt
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    release, _, path, items = setup
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={release},dtype=float32", tasks=["polyak_next_chunk"], device="cpu",
        batch_size=4, log_samples=True,
        task_manager=TaskManager(include_path=str(ROOT / "eval" / "lm_eval_task"), include_defaults=False,
                                 metadata={"data_file": str(path)}))

    # The same items scored directly: the sum of log p(continuation tokens | context), the context tokenised on
    # its own and the continuation as the rest of context + " " + choice, as lm-eval splits a request.
    model = AutoModelForCausalLM.from_pretrained(release, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(release)
    lls, correct, correct_norm = [], [], []
    for item in items:
        context = tokenizer(item["context"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in item["choices"]:
            whole = tokenizer(item["context"] + " " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor(context + whole[len(context):])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1].float(), dim=-1)
            positions = torch.arange(len(context) - 1, len(ids) - 1)
            scores.append(logp[positions, ids[positions + 1]].sum().item())
        lls.append(scores)
        correct.append(int(np.argmax(scores)) == item["label"])
        lengths = np.array([len(c) for c in item["choices"]], dtype=float)
        correct_norm.append(int(np.argmax(np.array(scores) / lengths)) == item["label"])

    samples = sorted(out["samples"]["polyak_next_chunk"], key=lambda s: s["doc_id"])
    assert [s["doc"]["context"] for s in samples] == [item["context"] for item in items]
    assert np.allclose([[r[0] for r in s["filtered_resps"]] for s in samples], lls, atol=1e-4)
    metrics = out["results"]["polyak_next_chunk"]
    assert metrics["acc,none"] == pytest.approx(np.mean(correct), abs=1e-12)
    assert metrics["acc_norm,none"] == pytest.approx(np.mean(correct_norm), abs=1e-12)


def test_val_documents_round_trip_a_prepared_folder(data_dir):
    from tokenizers import Tokenizer

    meta = json.loads((data_dir / "meta.json").read_text())
    docs = val_documents(data_dir)
    tokenizer = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    ids = [t for d in docs for t in [*tokenizer.encode(d).ids, meta["eos_id"]]]
    assert ids == np.fromfile(data_dir / "val.bin", dtype=meta["dtype"]).tolist()
    assert (len(docs), sum(len(d.encode()) for d in docs)) == (meta["val_documents"], meta["val_bytes"])
