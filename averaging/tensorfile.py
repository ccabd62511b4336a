"""safetensors files written as a stream: the header first (every size is known up front), then each tensor's bytes
as its pieces come, so that nothing the size of the file is ever held in memory (safetensors' own save_file wants
every tensor whole). Optionally the SHA-256 of the data section goes into the header's metadata, so that the file
verifies itself: the digest is computed while the bytes are written and patched into a placeholder at the end.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

DIGEST = "sha256"  # the metadata key of the data section's digest
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16"}
_PLACEHOLDER = "0" * 64


@dataclass
class Entry:
    """One tensor to write: its name, dtype and shape, and its pieces in order (flattened, any dtype: each piece is
    converted as it is written)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: Callable[[], Iterable[torch.Tensor]]


def write(path: Path, entries: Sequence[Entry], metadata: dict[str, str] | None = None, digest: bool = False,
          progress: Callable[[int], object] | None = None) -> None:
    """Write `entries` to `path` in safetensors' format (the caller syncs and renames it into place)."""
    header, offset = {"__metadata__": {**(metadata or {}), **({DIGEST: _PLACEHOLDER} if digest else {})}}, 0
    for e in entries:
        nbytes = math.prod(e.shape) * torch.empty(0, dtype=e.dtype).element_size()
        header[e.name] = {"dtype": _DTYPES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # the tensors start 8-byte aligned
    h = hashlib.sha256()
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded)
        for e in entries:
            written = 0
            for piece in e.pieces():
                # safetensors is little-endian, as is every machine torch runs on
                data = piece.detach().to("cpu", e.dtype).contiguous().view(torch.uint8).numpy()
                f.write(data)
                if digest:
                    h.update(data)
                written += data.nbytes
                if progress is not None:
                    progress(data.nbytes)
            want = header[e.name]["data_offsets"]
            if written != want[1] - want[0]:
                raise ValueError(f"{e.name}: {written} bytes written, its shape needs {want[1] - want[0]}")
        if digest:
            f.seek(8 + encoded.index(f'"{DIGEST}": "{_PLACEHOLDER}"'.encode()) + len(f'"{DIGEST}": "'))
            f.write(h.hexdigest().encode())


def read_header(path: Path) -> tuple[dict, int]:
    """A file's header and where its data section starts."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size)), 8 + size


def verify(path: Path) -> str | None:
    """What is wrong with a file written with `digest=True`, in words; None when its data match its digest."""
    try:
        header, start = read_header(path)
        expected = header["__metadata__"][DIGEST]
    except FileNotFoundError:
        return "missing"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "not a safetensors file with a digest"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if path.stat().st_size != start + end:
        return f"{path.stat().st_size} bytes, its header says {start + end}"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return None if h.hexdigest() == expected else "its data differ from the SHA-256 in its header"
