"""data/: sources, tokenizers, preparation and the train/val batch order, on real corpora and real tokenizers."""

import json
import os
import pickle
import random
import subprocess
import sys
import sysconfig
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from data.loader import TokenWindows, TrainBatches, load_meta, val_batches
from data.prepare import prepare
from data.sources import index_in_val, path_in_val
from data.tokenizer import EOS, load_tokenizer, train_bpe, write_hf_tokenizer_files
from polyak.errors import UserError
from polyak.recipe import DataConfig

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a model data token weight average loss step rank batch window stream byte merge".split()


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    """Keep the datasets' cache of test files out of the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-datasets")


@pytest.fixture(scope="module")
def stdlib_dir(tmp_path_factory):
    return prepare(DataConfig(dir=str(tmp_path_factory.mktemp("stdlib") / "d"), max_tokens=100_000))


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"Line {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))) + "." for i in range(n)]


# Documents that a careless tokenisation would get wrong; the empty one must be skipped.
TRICKY = ["naïve café, 東京 and 🙂", "a literal <|endoftext|> inside a document", "  leading and trailing  ",
          "tabs\tand\r\nwindows\r\nline ends", "def f(x):\n    return x  # code\n", "", "\n\nblank lines\n\n"]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def tokens(data_dir: Path, split: str) -> np.ndarray:
    return np.fromfile(Path(data_dir) / f"{split}.bin", dtype=load_meta(data_dir)["dtype"])


def documents(data_dir: Path, split: str) -> list[str]:
    """The documents of a split: its token stream cut after each EOS, each piece decoded."""
    tokenizer, eos = load_tokenizer(data_dir), load_meta(data_dir)["eos_id"]
    stream = tokens(data_dir, split)
    assert stream[-1] == eos
    ends = np.flatnonzero(stream == eos)
    return [tokenizer.decode(stream[s:e].tolist()) for s, e in zip(np.r_[0, ends[:-1] + 1], ends)]


def expected_split(docs: list[str], split: str, val_fraction: float) -> list[str]:
    val = index_in_val(np.arange(len(docs)), val_fraction)
    return [d for d, v in zip(docs, val) if d and v == (split == "val")]


def same_files(a: Path, b: Path, names=("train.bin", "val.bin", "tokenizer.json")) -> bool:
    return all((Path(a) / n).read_bytes() == (Path(b) / n).read_bytes() for n in names)


# --- preparation -------------------------------------------------------------------------------------------------

def test_stdlib_is_split_by_file_stably(stdlib_dir):
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                   if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))
    val = {f for f in files if path_in_val(f, 0.05)}
    assert 0.02 < len(val) / len(files) < 0.10
    meta = load_meta(stdlib_dir)
    for split in ("train", "val"):
        texts = [(root / f).read_bytes().decode("utf-8", errors="replace") for f in files
                 if (f in val) == (split == "val")]
        got = documents(stdlib_dir, split)
        assert got == [t for t in texts if t][:len(got)]  # whole files, in path order
        assert meta[f"{split}_documents"] == len(got)
        assert meta[f"{split}_bytes"] == sum(len(d.encode()) for d in got)
        assert meta[f"{split}_tokens"] == len(tokens(stdlib_dir, split))
    assert meta["train_tokens"] + meta["val_tokens"] <= 100_000
    assert meta["vocab_size"] == 4096 and meta["dtype"] == "uint16" and meta["tokenizer"] == "bpe"


def test_split_hashes_are_the_same_in_every_process():
    # fixed values: a per-process hash (Python's hash() of a str) would change them from run to run
    assert [path_in_val(f"m{i}.py", 0.5) for i in range(10)] == [0, 1, 1, 1, 1, 0, 1, 1, 0, 1]
    assert np.flatnonzero(index_in_val(np.arange(40), 0.25)).tolist() == [3, 10, 18, 20, 21, 33]


def test_preparing_twice_gives_identical_files(stdlib_dir, tmp_path):
    again = prepare(DataConfig(dir=str(tmp_path / "again"), max_tokens=100_000))
    assert same_files(stdlib_dir, again)


def test_streams_decode_to_the_documents_joined_with_eos(tmp_path):
    docs = TRICKY + sentences(80)
    cfg = DataConfig(source="files", files=[str(write_jsonl(tmp_path / "docs.jsonl", docs))],
                     dir=str(tmp_path / "d"), val_fraction=0.2, bpe_vocab_size=300)
    out = prepare(cfg)
    meta = load_meta(out)
    train, val = documents(out, "train"), documents(out, "val")
    assert train == expected_split(docs, "train", 0.2) and val == expected_split(docs, "val", 0.2)
    assert sorted(train + val) == sorted(d for d in docs if d)  # every document once, whichever split
    assert TRICKY[1] in train + val  # the literal "<|endoftext|>" stayed text
    assert meta["eos_id"] == load_tokenizer(out).token_to_id(EOS) and meta["dtype"] == "uint16"
    assert meta["train_bytes"] == sum(len(d.encode()) for d in train)
    assert (meta["train_documents"], meta["val_documents"]) == (len(train), len(val))


def test_files_sources_agree_across_formats_and_globs(tmp_path):
    docs = sentences(120, seed=1)
    (tmp_path / "docs.txt").write_text("".join(d + "\n" for d in docs))
    write_jsonl(tmp_path / "docs.jsonl", docs, field="content")
    pq.write_table(pa.table({"content": docs}), tmp_path / "docs.parquet")
    (tmp_path / "shards").mkdir()
    write_jsonl(tmp_path / "shards" / "a.jsonl", docs[:50], field="content")
    write_jsonl(tmp_path / "shards" / "b.jsonl", docs[50:], field="content")
    dirs = [prepare(DataConfig(source="files", files=files, text_field="content", bpe_vocab_size=300,
                               dir=str(tmp_path / f"out{i}"), val_fraction=0.1))
            for i, files in enumerate([[str(tmp_path / "docs.txt")], [str(tmp_path / "docs.jsonl")],
                                       [str(tmp_path / "docs.parquet")], [str(tmp_path / "shards" / "*.jsonl")]])]
    assert documents(dirs[0], "val") == expected_split(docs, "val", 0.1)
    assert all(same_files(dirs[0], d) for d in dirs[1:])


def test_the_hub_path_streams_like_the_files_source(tmp_path):
    docs = sentences(150, seed=2)
    (tmp_path / "dataset").mkdir()
    write_jsonl(tmp_path / "dataset" / "part.jsonl", docs)
    common = dict(bpe_vocab_size=300, val_fraction=0.1)
    for max_tokens in (None, 1500):
        hub = prepare(DataConfig(source="hub", name=str(tmp_path / "dataset"), max_tokens=max_tokens,
                                 dir=str(tmp_path / f"hub{max_tokens}"), **common))
        files = prepare(DataConfig(source="files", files=[str(tmp_path / "dataset" / "part.jsonl")],
                                   max_tokens=max_tokens, dir=str(tmp_path / f"files{max_tokens}"), **common))
        assert same_files(hub, files)
    assert load_meta(hub)["train_tokens"] + load_meta(hub)["val_tokens"] <= 1500


def test_max_tokens_keeps_whole_documents_within_each_budget(tmp_path):
    docs = sentences(300, seed=3)
    tokenizer = train_bpe([docs], 300)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    common = dict(source="files", files=[str(write_jsonl(tmp_path / "d.jsonl", docs))], val_fraction=0.1,
                  tokenizer=str(tmp_path / "tokenizer.json"))
    full = prepare(DataConfig(dir=str(tmp_path / "full"), **common))
    cut = prepare(DataConfig(dir=str(tmp_path / "cut"), max_tokens=3000, **common))
    assert load_meta(cut)["train_tokens"] + load_meta(cut)["val_tokens"] <= 3000
    eos = load_meta(full)["eos_id"]
    for split, budget in (("train", 2700), ("val", 300)):
        whole, kept = tokens(full, split), tokens(cut, split)
        assert len(kept) <= budget and np.array_equal(kept, whole[:len(kept)]) and kept[-1] == eos
        next_end = np.flatnonzero(whole[len(kept):] == eos)[0] + 1
        assert len(kept) + next_end > budget  # stopped only when the next document did not fit


def test_large_vocabularies_are_stored_as_uint32(tmp_path):
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {f"<unused{i}>": i for i in range(70_000 - len(alphabet))}
    vocab |= {ch: len(vocab) + k for k, ch in enumerate(alphabet)}
    big = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    big.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    big.decoder = decoders.ByteLevel()
    big.add_special_tokens([EOS])
    big.save(str(tmp_path / "big.json"))
    docs = TRICKY + sentences(20)
    out = prepare(DataConfig(source="files", files=[str(write_jsonl(tmp_path / "d.jsonl", docs))], val_fraction=0.2,
                             tokenizer=str(tmp_path / "big.json"), dir=str(tmp_path / "d")))
    meta = load_meta(out)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_001 and meta["eos_id"] == 70_000
    assert tokens(out, "train").max() == 70_000 and tokens(out, "train").min() >= 70_000 - 256
    assert documents(out, "train") == expected_split(docs, "train", 0.2)


def test_reuse_mismatch_restart_and_foreign_dirs(tmp_path, capsys):
    common = dict(source="files", files=[str(write_jsonl(tmp_path / "d.jsonl", sentences(100)))],
                  bpe_vocab_size=300, val_fraction=0.1)
    out = prepare(DataConfig(dir=str(tmp_path / "a"), num_proc=2, **common))
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    capsys.readouterr()
    assert prepare(DataConfig(dir=str(out), seq_len=32, num_proc=1, **common)) == out  # no content change
    assert "already prepared" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    with pytest.raises(UserError, match=r"data.dir=.*/a'.*data.bpe_vocab_size.*delete it"):
        prepare(DataConfig(dir=str(out), **{**common, "bpe_vocab_size": 400}))

    unfinished = tmp_path / "b"
    unfinished.mkdir()
    for name in ("train.bin", "train.bin.tmp", "tokenizer.json.tmp", "meta.json.tmp", "notes.txt"):
        (unfinished / name).write_text("left by an interrupted run")
    prepare(DataConfig(dir=str(unfinished), num_proc=1, **common))
    assert same_files(out, unfinished)  # one process and two give the same files
    assert sorted(p.name for p in unfinished.iterdir()) == ["meta.json", "notes.txt", "tokenizer.json",
                                                            "train.bin", "val.bin"]

    foreign = tmp_path / "c"
    foreign.mkdir()
    (foreign / "train.bin").write_bytes(b"someone's data")
    with pytest.raises(UserError, match="holds train.bin but no meta.json"):
        prepare(DataConfig(dir=str(foreign), **common))
    assert (foreign / "train.bin").read_bytes() == b"someone's data"


def test_bad_files_are_named(tmp_path):
    def files_cfg(*files, **kw):
        return DataConfig(source="files", files=list(files), dir=str(tmp_path / "d"), **kw)

    with pytest.raises(UserError, match=r"file not found: .*/nope\.jsonl$"):
        prepare(files_cfg(str(tmp_path / "nope.jsonl")))
    with pytest.raises(UserError, match=r"no file matches '.*/\*\.parquet'"):
        prepare(files_cfg(str(tmp_path / "*.parquet")))
    write_jsonl(tmp_path / "d.jsonl", ["x"], field="body")
    with pytest.raises(UserError, match=r"data.text_field='text' is not a field of .*d\.jsonl \(fields: body, id\)"):
        prepare(files_cfg(str(tmp_path / "d.jsonl")))
    with pytest.raises(UserError, match=r"data.tokenizer: file not found: .*/missing\.json"):
        prepare(files_cfg(str(tmp_path / "d.jsonl"), text_field="body", tokenizer=str(tmp_path / "missing.json")))


def run_offline(tmp_path, *overrides) -> subprocess.CompletedProcess:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data:\n  dir: {tmp_path / 'd'}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    sets = [a for o in overrides for a in ("--set", o)]
    return subprocess.run([sys.executable, "-m", "data.prepare", "--recipe", str(recipe), *sets],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_offline_hub_dataset_is_a_one_line_error(tmp_path):
    done = run_offline(tmp_path, "data.source=hub", "data.name=HuggingFaceFW/fineweb-edu", "data.subset=sample-10BT")
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith("error: data.name='HuggingFaceFW/fineweb-edu': cannot reach the Hugging Face hub")
    assert "data.source: files" in done.stderr


def test_offline_hub_tokenizer_is_a_one_line_error(tmp_path):
    docs = write_jsonl(tmp_path / "d.jsonl", sentences(10))
    done = run_offline(tmp_path, "data.source=files", f"data.files=[{docs}]", "data.tokenizer=gpt2")
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith("error: data.tokenizer='gpt2': cannot reach the Hugging Face hub")
    assert "data.tokenizer: bpe" in done.stderr
    assert not (tmp_path / "d").exists()


def test_hf_tokenizer_files_round_trip_through_auto_tokenizer(stdlib_dir, tmp_path):
    from transformers import AutoTokenizer

    write_hf_tokenizer_files(stdlib_dir, tmp_path / "release")
    auto = AutoTokenizer.from_pretrained(tmp_path / "release")
    ours = load_tokenizer(stdlib_dir)
    assert auto.is_fast and auto.eos_token == EOS and auto.eos_token_id == load_meta(stdlib_dir)["eos_id"]
    for text in ["def average(x, y):\n    return (x + y) / 2  # mean\n", "naïve café , 東京 🙂 .", "  a  b "]:
        assert auto(text)["input_ids"] == ours.encode(text).ids
        assert auto.decode(auto(text)["input_ids"]) == text


# --- windows and batches ------------------------------------------------------------------------------------------

def counting_dir(path: Path, n_tokens: int) -> Path:
    """A prepared directory whose streams count 0, 1, 2, ...: a window's first token tells which window it is."""
    path.mkdir()
    for split in ("train", "val"):
        np.arange(n_tokens, dtype=np.uint16).tofile(path / f"{split}.bin")
    (path / "meta.json").write_text(json.dumps({"dtype": "uint16", "train_tokens": n_tokens, "val_tokens": n_tokens}))
    return path


def test_token_windows_are_shifted_slices_of_the_stream(stdlib_dir):
    windows = TokenWindows(stdlib_dir, "train", 64)
    stream = tokens(stdlib_dir, "train")
    assert len(windows) == (len(stream) - 1) // 64
    for i in (0, 1, len(windows) - 1):
        assert windows[i].dtype == torch.int64
        assert torch.equal(windows[i], torch.from_numpy(stream[i * 64:i * 64 + 65].astype(np.int64)))
    copy = pickle.loads(pickle.dumps(windows))  # after use: the memory map reopens in the copy
    assert torch.equal(copy[5], windows[5])
    with pytest.raises(IndexError):
        windows[len(windows)]
    val_tokens = load_meta(stdlib_dir)["val_tokens"]
    with pytest.raises(UserError, match=f"the val split of .* has {val_tokens} tokens"):
        TokenWindows(stdlib_dir, "val", val_tokens)
    with pytest.raises(UserError, match="is not a prepared data folder"):
        load_meta(stdlib_dir.parent)


def global_batches(windows, world_size, micro_batch, seed, steps, consumed=0):
    """Each step's micro-batches of all ranks, concatenated in rank order."""
    ranks = [TrainBatches(windows, r, world_size, micro_batch, seed, consumed) for r in range(world_size)]
    steps_out = []
    for _ in range(steps):
        xs, ys = zip(*(rank.next() for rank in ranks))
        steps_out.append((torch.cat(xs), torch.cat(ys)))
    return steps_out


def test_ranks_split_the_global_batch_of_one_rank(tmp_path):
    windows = TokenWindows(counting_dir(tmp_path / "c", 245), "train", 4)  # 61 windows: 7 global batches of 8
    one = global_batches(windows, 1, 8, seed=7, steps=14)
    four = global_batches(windows, 4, 2, seed=7, steps=14)
    for (x1, y1), (x4, y4) in zip(one, four):
        assert torch.equal(x1, x4) and torch.equal(y1, y4)
        assert torch.equal(x1, x1[:, :1] + torch.arange(4)) and torch.equal(y1, x1 + 1)
    ids = [x[:, 0] // 4 for x, _ in one]
    epoch0, epoch1 = torch.cat(ids[:7]), torch.cat(ids[7:])
    assert len(set(epoch0.tolist())) == len(set(epoch1.tolist())) == 56  # no window twice in an epoch
    assert not torch.equal(epoch0, epoch1)  # a new permutation each epoch
    other_seed = torch.cat([x[:, 0] // 4 for x, _ in global_batches(windows, 1, 8, seed=8, steps=7)])
    assert not torch.equal(epoch0, other_seed)


def test_resume_continues_exactly_on_any_world_size(tmp_path):
    windows = TokenWindows(counting_dir(tmp_path / "c", 245), "train", 4)
    reference = global_batches(windows, 4, 2, seed=3, steps=16)
    run = TrainBatches(windows, 1, 4, 2, seed=3)
    for _ in range(9):
        run.next()
    state = run.state_dict()
    assert state == {"consumed": 9, "seed": 3}
    resumed = TrainBatches(windows, 1, 4, 2, seed=0)
    resumed.next()  # an order of its own, which loading the state must replace
    resumed.load_state_dict(state)
    for step in range(9, 16):
        assert torch.equal(resumed.next()[0], reference[step][0][2:4])
    for step, (x, y) in enumerate(global_batches(windows, 2, 4, seed=3, steps=7, consumed=9), start=9):
        assert torch.equal(x, reference[step][0]) and torch.equal(y, reference[step][1])


def test_val_batches_are_the_first_windows_in_order(tmp_path):
    windows = TokenWindows(counting_dir(tmp_path / "c", 101), "val", 4)  # 25 windows
    ranks = [val_batches(windows, r, 2, 3, n_batches=3) for r in range(2)]
    assert [len(r) for r in ranks] == [3, 3]
    firsts = torch.cat([torch.cat([ranks[r][g][0][:, 0] for r in range(2)]) for g in range(3)])
    assert torch.equal(firsts, torch.arange(18) * 4)
    again = val_batches(windows, 1, 2, 3, n_batches=3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(again, ranks[1]))
    assert len(val_batches(windows, 0, 2, 3, n_batches=100)) == 4  # all the whole global batches there are
    with pytest.raises(UserError, match="the val split has 25 windows"):
        val_batches(windows, 0, 4, 7, n_batches=1)
