"""Documents for pre-training as Hugging Face datasets, split into train and val by a stable hash.

Three sources (`data.source`):
  stdlib  the installed Python's standard-library source, one document per *.py file, split by file path
  files   local .txt / .jsonl / .parquet files or globs; a .txt file holds one document per line
  hub     a hub dataset, streamed; split by document index
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from datasets.exceptions import DatasetNotFoundError

from polyak.errors import UserError
from polyak.recipe import DataConfig

_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


@dataclass
class Corpus:
    """A split corpus: `splits` maps train/val to datasets, or `stream` holds every document with a `val` column."""

    splits: dict[str, datasets.Dataset] | None = None
    stream: datasets.IterableDataset | None = None

    def train_texts(self, max_bytes: int, batch_size: int = 1000):
        """Batches of train documents, in corpus order, until `max_bytes` of UTF-8 text have been given."""
        if self.splits is not None:
            batches = (b["text"] for b in self.splits["train"].iter(batch_size))
        else:
            train = self.stream.filter(lambda b: [not v for v in b["val"]], batched=True)
            batches = (b["text"] for b in train.iter(batch_size))
        given = 0
        for texts in batches:
            sample = []
            for text in filter(None, texts):
                sample.append(text)
                given += len(text.encode())
                if given >= max_bytes:
                    break
            yield sample
            if given >= max_bytes:
                return


def describe(cfg: DataConfig) -> tuple[str, str]:
    """(description, source_hash) of the configured source, without reading any document."""
    if cfg.source == "stdlib":
        root = _stdlib_root()
        files = [(str(p.relative_to(root)), p.stat().st_size) for p in _stdlib_files(root)]
        return f"Python {sysconfig.get_python_version()} standard library at {root}", _hash(files)
    if cfg.source == "files":
        files = [(p, Path(p).stat().st_size) for p in _expand(cfg.files)]
        return f"{len(files)} local file(s): {', '.join(cfg.files)}", _hash(files)
    name = cfg.name + (f" ({cfg.subset})" if cfg.subset else "")
    return f"hub dataset {name}", _hash([cfg.name, cfg.subset])


def load_corpus(cfg: DataConfig) -> Corpus:
    if cfg.source == "stdlib":
        return Corpus(splits=_stdlib_splits(cfg.val_fraction))
    if cfg.source == "files":
        documents = _load_files(_expand(cfg.files), cfg.text_field)
        val = index_in_val(np.arange(len(documents)), cfg.val_fraction)
        splits = {
            "train": documents.select(np.flatnonzero(~val), keep_in_memory=True),
            "val": documents.select(np.flatnonzero(val), keep_in_memory=True),
        }
        return Corpus(splits=splits)
    stream = _stream_hub(cfg).map(
        lambda b, idx: {"val": index_in_val(np.asarray(idx), cfg.val_fraction).tolist()},
        batched=True, with_indices=True)
    return Corpus(stream=stream)


def path_in_val(path: str, val_fraction: float) -> bool:
    """Whether a document keyed by `path` belongs to val: a stable hash of the key, so each machine splits alike."""
    digest = hashlib.blake2b(path.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


def index_in_val(index: np.ndarray, val_fraction: float) -> np.ndarray:
    """Whether each document index belongs to val: the splitmix64 mix of the index against `val_fraction`."""
    z = index.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return z < np.uint64(val_fraction * 2**64)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files(root: Path) -> list[Path]:
    """Every *.py file under `root`, installed packages left out, sorted by relative path."""
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in ("site-packages", "dist-packages", "__pycache__")]
        files += [Path(folder, name) for name in names if name.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _stdlib_splits(val_fraction: float) -> dict[str, datasets.Dataset]:
    root = _stdlib_root()
    texts = {"train": [], "val": []}
    for path in _stdlib_files(root):
        split = "val" if path_in_val(path.relative_to(root).as_posix(), val_fraction) else "train"
        # A few test modules are deliberately not UTF-8.
        texts[split].append(path.read_bytes().decode("utf-8", errors="replace"))
    return {split: datasets.Dataset.from_dict({"text": t}) for split, t in texts.items()}


def _expand(patterns: list[str]) -> list[str]:
    """Files named by `data.files`, globs expanded in sorted order, each file once."""
    files = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matches:
                raise UserError(f"data.files: no file matches {pattern!r}")
        elif Path(pattern).is_dir():
            raise UserError(f"data.files: {pattern!r} is a directory; name its files, or a glob like {pattern}/*.jsonl")
        elif not Path(pattern).is_file():
            raise UserError(f"data.files: file not found: {pattern}")
        else:
            matches = [pattern]
        files += [p for p in matches if p not in files]
    for path in files:
        _builder(path)
    return files


def _builder(path: str) -> str:
    name = path.lower()
    for compression in _COMPRESSIONS:
        name = name.removesuffix(compression)
    builder = _BUILDERS.get(Path(name).suffix)
    if builder is None:
        raise UserError(f"data.files: {path}: unknown kind of file; expected one of {', '.join(_BUILDERS)}")
    return builder


def _load_files(files: list[str], text_field: str) -> datasets.Dataset:
    """All documents of `files` in order, as one dataset with a single `text` column."""
    parts = []
    for builder, group in itertools.groupby(files, key=_builder):
        group = list(group)
        part = datasets.load_dataset(builder, data_files=group, split="train")
        field = "text" if builder == "text" else text_field
        parts.append(_only_text(part, field, group[0]))
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def _stream_hub(cfg: DataConfig) -> datasets.IterableDataset:
    what = cfg.name + (f" (subset {cfg.subset})" if cfg.subset else "")
    try:
        stream = datasets.load_dataset(cfg.name, cfg.subset, split="train", streaming=True)
    except ConnectionError:
        raise UserError(f"data.name={cfg.name!r}: cannot reach the Hugging Face hub to stream {what}; "
                        "use data.source: files with a local copy, or run where the hub is reachable") from None
    except DatasetNotFoundError:
        raise UserError(f"data.name={cfg.name!r}: no such dataset on the Hugging Face hub") from None
    except ValueError as e:
        raise UserError(f"data.name={cfg.name!r} data.subset={cfg.subset!r}: {str(e).splitlines()[0]}") from None
    return _only_text(stream, cfg.text_field, what)


def _only_text(ds, field: str, what: str):
    """`ds` reduced to its `field` column, named `text`."""
    if ds.column_names is not None and field not in ds.column_names:
        raise UserError(f"data.text_field={field!r} is not a field of {what} (fields: {', '.join(ds.column_names)})")
    ds = ds.select_columns([field])
    return ds if field == "text" else ds.rename_column(field, "text")
