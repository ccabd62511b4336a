"""The recipe: YAML with `base:` chains and dotted `--set` overrides, validated once into typed dataclasses."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from polyak.errors import UserError


@dataclass
class RunConfig:
    name: str = "run"
    dir: str = "runs/run"


@dataclass
class ModelConfig:
    size: str | None = "tiny"  # a name from model/sizes.py, or None with explicit dimensions
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    ffn_dim: int | None = None
    vocab_size: int | None = None  # None: the tokenizer's vocabulary, rounded up to a multiple of 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02


@dataclass
class DataConfig:
    source: str = "stdlib"  # stdlib | hub | files
    name: str | None = None  # hub dataset, e.g. HuggingFaceFW/fineweb-edu
    subset: str | None = None  # hub dataset configuration, e.g. sample-10BT
    files: list[str] = field(default_factory=list)  # local .txt / .jsonl / .parquet files or globs
    text_field: str = "text"
    tokenizer: str = "bpe"  # bpe: byte-level BPE trained on the corpus; else a hub name or a tokenizer.json path
    bpe_vocab_size: int = 4096
    dir: str = "data/prepared/stdlib"
    seq_len: int = 256
    val_fraction: float = 0.05
    max_tokens: int | None = None  # token budget over both splits
    num_proc: int = 1


@dataclass
class TrainConfig:
    steps: int = 100
    seed: int = 1234
    micro_batch: int = 8  # sequences per rank per micro-step
    grad_accum: int = 1
    lr: float = 3e-3
    schedule: str = "cosine"  # cosine | linear | wsd | constant
    warmup: int = 0  # steps
    final_lr: float = 0.1  # fraction of lr reached at the last step
    decay_fraction: float = 0.2  # wsd: the share of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    precision: str = "fp32"  # fp32 | bf16
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops


@dataclass
class ZeroConfig:
    reduce_bucket_size: int = 50_000_000
    prefetch_bucket_size: int = 50_000_000
    param_persistence_threshold: int = 100_000
    offload_optimizer: str = "none"  # none | cpu
    activation_checkpointing: bool = False
    compile: bool = False  # engine.compile(): torch.compile of the model inside the engine
    deepcompile: bool = False  # with compile: DeepSpeed's DeepCompile backend (ZeRO-3 in the graph; CUDA only)


@dataclass
class CheckpointConfig:
    every: int = 0  # 0: only at the end
    keep_last: int = 0  # 0: keep all
    keep_best: int = 0  # by val loss
    keep_every: int = 0  # also keep every k-th step for post-hoc averaging


@dataclass
class EvalConfig:
    every: int = 0  # 0: only at the end
    batches: int = 8  # micro-batches per rank


@dataclass
class LogConfig:
    every: int = 1
    progress: bool = True
    wandb: bool = False
    wandb_project: str = "polyak"
    peak_tflops: float | None = None  # per-device peak for MFU; None: looked up by device name


MAX_SIGMA_REL = (1 / 12) ** 0.5  # a power profile with exponent 0 (the plain mean of all samples)


@dataclass
class AverageConfig:
    kind: str = "ema"  # ema | lawa | power
    beta: float = 0.9  # ema decay
    window: int = 10  # lawa queue length
    sigma_rel: float = 0.05  # power: the width of its profile relative to the run so far (EDM2)
    every: int = 1  # sample when step % every == 0


@dataclass
class SpikeGuardConfig:
    enabled: bool = False
    factor: float = 1.5  # a loss above factor × the median of the recent history is a spike
    history: int = 20  # steps of recent loss history
    skip: int = 0  # samples skipped after a spike


@dataclass
class AveragingConfig:
    offload: str = "none"  # none | cpu
    spike_guard: SpikeGuardConfig = field(default_factory=SpikeGuardConfig)
    # Every other key of the `averaging` section names an average: `averaging: {ema: {kind: ema}}`.
    averages: dict[str, AverageConfig] = field(default_factory=dict, metadata={"inline": True})


@dataclass
class SnapshotConfig:
    """Weights-only copies of every rank's partitions in <run.dir>/snapshots/ (averaging/snapshots.py). A LAWA keeps
    its samples there whatever this says; `every` adds scheduled snapshots, for post-hoc averaging."""

    every: int = 0  # a scheduled snapshot every `every` optimizer steps; 0: none
    weights: list[str] = field(default_factory=lambda: ["raw"])  # what one holds: raw and/or averages' names
    dtype: str = "fp32"  # fp32 | bf16: of the scheduled snapshots (a LAWA's samples are always fp32)
    keep_last: int = 0  # scheduled snapshots kept: the newest n; 0 keeps all
    keep_every: int = 0  # also keep every k-th step's


@dataclass
class HardwareConfig:
    """The machines a recipe is sized for: `python -m launch.plan` checks that it fits them."""

    gpu: str | None = None  # the GPU's name, e.g. "H100 80GB"; None: CPU ranks
    gpu_memory_gib: float | None = None  # per GPU, as the device reports it; set with gpu
    ranks_per_node: int = 2  # GPUs, or CPU processes, per node
    nodes: int = 1
    host_memory_gib: float = 8.0  # per node


@dataclass
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    averaging: AveragingConfig = field(default_factory=AveragingConfig)
    snapshots: SnapshotConfig = field(default_factory=SnapshotConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)


def load_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> Recipe:
    """Read a recipe file (following `base:`), apply `key=value` overrides, validate."""
    raw, origin = _read_chain(Path(path), seen=())
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        _set_dotted(raw, key.split("."), value)
        origin[key] = f"--set {key}"
    recipe = _build(Recipe, raw, "", origin)
    validate(recipe, origin)
    return recipe


def recipe_from_dict(raw: dict, source: str = "<dict>") -> Recipe:
    """Build a recipe from a saved, already resolved dict (as `save_recipe` writes it)."""
    recipe = _build(Recipe, raw, "", _Origins(source))
    validate(recipe, _Origins(source))
    return recipe


def recipe_to_dict(obj) -> dict:
    """The plain-dict form of a recipe, as its YAML reads (inline fields folded into their section)."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = recipe_to_dict(value)
        elif isinstance(value, dict):
            value = {k: recipe_to_dict(v) if dataclasses.is_dataclass(v) else v for k, v in value.items()}
        if f.metadata.get("inline"):
            out.update(value)
        else:
            out[f.name] = value
    return out


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(recipe_to_dict(recipe), f, sort_keys=False)


def validate(r: Recipe, origin: dict) -> None:
    """Range checks across fields; each failure names the key and where it was set."""

    def check(ok: bool, key: str, value, why: str):
        if not ok:
            raise UserError(f"{_where(origin, key)}: {key}={value!r} {why}")

    t = r.train
    check(t.steps >= 1, "train.steps", t.steps, "must be at least 1")
    check(t.micro_batch >= 1, "train.micro_batch", t.micro_batch, "must be at least 1")
    check(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "must be at least 1")
    check(t.lr > 0, "train.lr", t.lr, "must be positive")
    check(t.schedule in ("cosine", "linear", "wsd", "constant"), "train.schedule", t.schedule,
          "must be one of cosine, linear, wsd, constant")
    check(0 <= t.warmup <= t.steps, "train.warmup", t.warmup, f"must be between 0 and train.steps ({t.steps})")
    check(0 <= t.final_lr <= 1, "train.final_lr", t.final_lr, "must be a fraction in [0, 1]")
    check(0 < t.decay_fraction <= 1, "train.decay_fraction", t.decay_fraction, "must be in (0, 1]")
    check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be non-negative")
    check(0 <= t.beta1 < 1, "train.beta1", t.beta1, "must be in [0, 1)")
    check(0 <= t.beta2 < 1, "train.beta2", t.beta2, "must be in [0, 1)")
    check(t.eps > 0, "train.eps", t.eps, "must be positive")
    check(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "must be non-negative")
    check(t.precision in ("fp32", "bf16"), "train.precision", t.precision, "must be fp32 or bf16")
    check(t.max_bad_steps >= 1, "train.max_bad_steps", t.max_bad_steps, "must be at least 1")

    d = r.data
    check(d.source in ("stdlib", "hub", "files"), "data.source", d.source, "must be one of stdlib, hub, files")
    check(d.source != "hub" or bool(d.name), "data.name", d.name, "must name a hub dataset when data.source is hub")
    check(d.source != "files" or bool(d.files), "data.files", d.files, "must list files when data.source is files")
    check(d.seq_len >= 2, "data.seq_len", d.seq_len, "must be at least 2")
    check(0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "must be in (0, 1)")
    check(d.bpe_vocab_size >= 260, "data.bpe_vocab_size", d.bpe_vocab_size, "must be at least 260")
    check(d.max_tokens is None or d.max_tokens > 0, "data.max_tokens", d.max_tokens, "must be positive")
    check(d.num_proc >= 1, "data.num_proc", d.num_proc, "must be at least 1")

    z = r.zero
    check(z.offload_optimizer in ("none", "cpu"), "zero.offload_optimizer", z.offload_optimizer, "must be none or cpu")
    for key in ("reduce_bucket_size", "prefetch_bucket_size", "param_persistence_threshold"):
        check(getattr(z, key) >= 0, f"zero.{key}", getattr(z, key), "must be non-negative")
    check(z.compile or not z.deepcompile, "zero.deepcompile", z.deepcompile,
          "needs zero.compile: true (DeepCompile is a backend of the engine's compile)")

    c = r.checkpoint
    for key in ("every", "keep_last", "keep_best", "keep_every"):
        check(getattr(c, key) >= 0, f"checkpoint.{key}", getattr(c, key), "must be non-negative (0 disables)")
    check(r.eval.every >= 0, "eval.every", r.eval.every, "must be non-negative (0: only at the end)")
    check(r.eval.batches >= 1, "eval.batches", r.eval.batches, "must be at least 1")
    check(r.log.every >= 1, "log.every", r.log.every, "must be at least 1")

    a = r.averaging
    check(a.offload in ("none", "cpu"), "averaging.offload", a.offload, "must be none or cpu")
    g = a.spike_guard
    check(g.factor > 1, "averaging.spike_guard.factor", g.factor, "must be above 1")
    check(g.history >= 1, "averaging.spike_guard.history", g.history, "must be at least 1")
    check(g.skip >= 0, "averaging.spike_guard.skip", g.skip, "must be non-negative")
    for name, avg in a.averages.items():
        check(name.isidentifier(), f"averaging.{name}", name, "must be a name of letters, digits and underscores")
        check(name != "raw", f"averaging.{name}", name, "'raw' names the training weights")
        check(avg.kind in ("ema", "lawa", "power"), f"averaging.{name}.kind", avg.kind, "must be ema, lawa or power")
        check(0 < avg.sigma_rel < MAX_SIGMA_REL, f"averaging.{name}.sigma_rel", avg.sigma_rel,
              f"must be in (0, {MAX_SIGMA_REL:.4f}): wider profiles weight the first samples more than the last")
        check(0 <= avg.beta < 1, f"averaging.{name}.beta", avg.beta, "must be in [0, 1)")
        check(avg.window >= 1, f"averaging.{name}.window", avg.window, "must be at least 1")
        check(avg.every >= 1, f"averaging.{name}.every", avg.every, "must be at least 1")

    s = r.snapshots
    check(s.dtype in ("fp32", "bf16"), "snapshots.dtype", s.dtype, "must be fp32 or bf16")
    check(bool(s.weights), "snapshots.weights", s.weights, "must name raw or averages")
    for name in s.weights:
        check(name == "raw" or name in a.averages, "snapshots.weights", s.weights,
              f"names {name!r}, which is neither raw nor an average of the averaging section")
    for key in ("every", "keep_last", "keep_every"):
        check(getattr(s, key) >= 0, f"snapshots.{key}", getattr(s, key), "must be non-negative (0 disables)")

    h = r.hardware
    check((h.gpu is None) == (h.gpu_memory_gib is None), "hardware.gpu_memory_gib", h.gpu_memory_gib,
          "must be set with hardware.gpu, and only then")
    check(h.gpu_memory_gib is None or h.gpu_memory_gib > 0, "hardware.gpu_memory_gib", h.gpu_memory_gib,
          "must be positive")
    check(h.ranks_per_node >= 1, "hardware.ranks_per_node", h.ranks_per_node, "must be at least 1")
    check(h.nodes >= 1, "hardware.nodes", h.nodes, "must be at least 1")
    check(h.host_memory_gib > 0, "hardware.host_memory_gib", h.host_memory_gib, "must be positive")

    m = r.model
    if m.size is None:
        for key in ("dim", "n_layers", "n_heads"):
            check(getattr(m, key) is not None, f"model.{key}", None, "must be set when model.size is null")
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
        value = getattr(m, key)
        check(value is None or value >= 1, f"model.{key}", value, "must be at least 1")


class _Origins(dict):
    """Where each key was set; keys never set point at the recipe itself."""

    def __init__(self, default: str):
        super().__init__()
        self.default = default

    def __missing__(self, key):
        return self.default


def _where(origin: dict, key: str) -> str:
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in origin:
            return origin[prefix]
    return origin[key]


def _read_chain(path: Path, seen: tuple) -> tuple[dict, _Origins]:
    if not path.is_file():
        raise UserError(f"recipe file not found: {path}")
    if path.resolve() in seen:
        raise UserError(f"{path}: `base:` chain loops back to itself")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"{path}: not valid YAML{at}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe must be a mapping of sections")
    base = raw.pop("base", None)
    if base is None:
        merged, origin = {}, _Origins(str(path))
    else:
        merged, origin = _read_chain(path.parent / base, seen + (path.resolve(),))
        origin.default = str(path)
    _merge(merged, raw, "", origin, str(path))
    return merged, origin


def _merge(into: dict, new: dict, prefix: str, origin: dict, source: str) -> None:
    for key, value in new.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, dotted + ".", origin, source)
        else:
            into[key] = value
            origin[dotted] = source


def _set_dotted(raw: dict, keys: list[str], value) -> None:
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {'.'.join(keys)}: {key} is not a section")
    node[keys[-1]] = value


def _build(cls, raw, prefix: str, origin: dict):
    if not isinstance(raw, dict):
        key = prefix.rstrip(".") or "recipe"
        raise UserError(f"{_where(origin, key)}: {key} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    inline = next((f.name for f in fields if f.metadata.get("inline")), None)
    kwargs, rest = {}, {}
    for key, value in raw.items():
        if key in hints and key != inline:
            kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}", origin)
        elif inline:
            rest[key] = value
        else:
            raise UserError(f"{_where(origin, prefix + str(key))}: unknown key '{prefix}{key}'")
    if inline:
        kwargs[inline] = _coerce(hints[inline], rest, prefix.rstrip("."), origin)
    return cls(**kwargs)


def _coerce(hint, value, key: str, origin: dict):
    def bad(expected: str):
        return UserError(f"{_where(origin, key)}: {key} must be {expected}, got {value!r}")

    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", origin)
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key, origin)
    if typing.get_origin(hint) is list:
        if not isinstance(value, list):
            raise bad("a list")
        return [_coerce(args[0], v, f"{key}[{i}]", origin) for i, v in enumerate(value)]
    if typing.get_origin(hint) is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        return {str(k): _coerce(args[1], v, f"{key}.{k}", origin) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if hint is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads 3e-4 as a string
                return float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    raise TypeError(f"unsupported recipe type {hint} for {key}")
