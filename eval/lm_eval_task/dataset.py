"""The items file as lm-eval's dataset; lm-eval imports this file by path, so it imports nothing from the repo."""

import json
from pathlib import Path


def load_items(data_file: str | None = None, **_):
    """`custom_dataset` of polyak_next_chunk: the JSONL named by --metadata '{"data_file": ...}' as the test split."""
    import datasets

    if not data_file or not Path(data_file).is_file():
        raise ValueError(f"polyak_next_chunk: pass the items file with --metadata '{{\"data_file\": PATH}}' "
                         f"(got {data_file!r}); write it with python -m eval.lm_eval_task.make")
    items = [json.loads(line) for line in Path(data_file).read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(items)})
