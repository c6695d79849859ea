"""Dataclass configs, loaded from TOML and overridden by `--section.key value` flags.

One `Config` composes a section per concern (model, parallel, train, optim, data, eval, run, checkpoint, resilience)
so that later features add fields without touching the loader. Every error is a `ConfigError` with a one-line
message that names the key and says how to fix it (with a "did you mean" suggestion for unknown keys).
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A bad config value or key; its message is one line meant for the user."""


@dataclass
class ModelConfig:
    """Transformer shape. Zero means "derive it" where noted."""

    arch: Literal["llama", "gpt2", "t5"] = "llama"  # llama: RMSNorm/RoPE/SwiGLU/GQA; gpt2: LayerNorm/learned pos/GELU;
    # t5: an encoder-decoder of llama blocks (engine/model/encoder_decoder.py), for train.objective span|ul2
    n_layers: int = 4  # t5: the encoder's layers
    n_decoder_layers: int = 0  # t5: the decoder's layers; 0: n_layers
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: same as n_heads (no grouped-query attention)
    ffn_hidden: int = 0  # 0: 4*d_model for gpt2; 8/3*d_model rounded up to a multiple of 64 for llama
    vocab_size: int = 0  # 0: the tokenizer's vocabulary padded up to a multiple of 64 (the same for every tp)
    seq_len: int = 128
    window: int = 0  # sliding-window attention (Mistral): each token sees the last `window` tokens; 0: all before it
    tie_embeddings: bool = True
    kernels: Literal["auto", "torch", "triton"] = "auto"
    recompute: Literal["none", "full", "selective"] = "none"
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02


@dataclass
class ParallelConfig:
    """Process-group grid: world = dp * dp_shard * pp * cp * tp (dp is what is left)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1  # context parallelism: each sample's sequence split over cp ranks (engine/parallel/context.py)
    cp_impl: Literal["ring", "alltoall"] = "ring"
    dp_shard: int = 1
    zero1: bool = False  # ZeRO-1: AdamW state sharded over the data-parallel group (engine.optim.distributed)
    grad_reduce_dtype: Literal["fp32", "bf16"] = "fp32"  # the data-parallel gradient reduction's dtype (bf16: half)
    bucket_mb: float = 25.0  # ZeRO-1's gradient buckets, reduce-scattered as backward goes (parallel/data_parallel.py)
    sp: bool = False
    pp_schedule: Literal["gpipe", "1f1b", "interleaved", "zb"] = "1f1b"
    virtual_stages: int = 1
    pp_layers: str = ""  # explicit layers per pipeline stage, e.g. "3,5,5,3"; "": balanced by count


@dataclass
class TrainConfig:
    steps: int = 200
    global_batch: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch: int = 0  # 0: global_batch / dp (no gradient accumulation)
    seed: int = 1234
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    param_dtype: Literal["fp32", "bf16"] = "fp32"  # bf16: bf16 parameters, fp32 gradients and master weights (ZeRO-1)
    fp8: Literal["off", "delayed", "current", "block"] = "off"  # FP8 linears (engine/precision/fp8.py); CPU: emulated
    fp8_amax_history: int = 16  # delayed scaling: steps of amax history the scale takes its max over
    fp8_margin: int = 0  # delayed scaling: 2^margin headroom on the history's amax
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0  # CPU intra-op threads per process; 0: OMP_NUM_THREADS if set, else cores / processes / 2
    objective: Literal["clm", "fim", "mlm", "mtp", "prefix", "span", "ul2"] = "clm"  # engine/objectives: next-token,
    # fill-in-the-middle, masked LM, multi-token prediction, prefix LM; span corruption and UL2 (model.arch t5)
    max_skipped_steps: int = 5  # consecutive steps with a non-finite gradient norm (skipped) before the run stops
    dry_run: bool = False  # build on the meta device for the layout, print parameter and memory counts, exit


@dataclass
class OptimConfig:
    name: Literal["adamw", "adafactor"] = "adamw"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # floor of cosine/WSD decay, as a fraction of lr
    schedule: Literal["cosine", "wsd", "inverse_sqrt", "constant"] = "cosine"
    warmup: int = 20  # steps
    decay_steps: int = 0  # schedule length; 0: train.steps
    wsd_decay_fraction: float = 0.1  # WSD: share of decay_steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip: float = 1.0  # global grad-norm clip; 0 turns it off
    impl: Literal["auto", "torch", "fused", "apex"] = "auto"


@dataclass
class DataConfig:
    path: str = "embedded"  # a prefix, a blend "w1 prefix1 w2 prefix2", or "embedded"
    valid_path: str = ""  # held-out prefix; "" with path=embedded: the embedded validation split
    tokenizer: str = "bpe"  # bpe (trained on the embedded corpus), byte, or a path to a tokenizer.json
    bpe_vocab: int = 4096  # vocabulary size when the BPE tokenizer is trained here
    cache_dir: str = ""  # "": $ENGINE_CACHE, else ~/.cache/engine
    document_mask: bool = False  # attention stays inside each document of a packed sample (split at EOD tokens)
    reset_positions: bool = False  # positions restart at 0 at each document of a packed sample


@dataclass
class EvalConfig:
    every: int = 50  # 0 turns evaluation off
    batches: int = 8


@dataclass
class RunConfig:
    dir: str = "runs/default"
    log_every: int = 1
    progress: bool = True
    tensorboard: bool = True  # when the tensorboard package is installed


@dataclass
class CheckpointConfig:
    every: int = 100  # 0 turns periodic checkpoints off (the final one is still written)
    keep: int = 3  # newest complete checkpoints kept; 0 keeps all
    async_: bool = False  # spelled `async` in TOML and flags
    force_resume: bool = False  # resume even when model/optimizer/schedule/data differ from the checkpoint


@dataclass
class ObjectiveConfig:
    """Rates of the objectives (train.objective)."""

    fim_rate: float = 0.5  # fim: share of documents transformed (Bavarian et al. 2022)
    fim_spm_rate: float = 0.5  # fim: share of the transformed ones in SPM order (else PSM)
    mlm_mask_rate: float = 0.15  # mlm: share of the non-special tokens selected (80% mask, 10% random, 10% kept)
    mtp_depth: int = 1  # mtp: sequential prediction modules, module k predicting token i+k+1 (DeepSeek-V3 sec. 2.2)
    mtp_lambda: float = 0.3  # mtp: weight of the modules' mean loss beside the next-token loss
    mtp_kind: Literal["sequential", "parallel"] = "sequential"  # mtp: DeepSeek-V3's chain or Gloeckle's heads
    prefix_min_frac: float = 0.0  # prefix: each sample's prefix length is uniform in [min_frac, max_frac] x seq_len
    prefix_max_frac: float = 1.0
    span_noise_density: float = 0.15  # span: share of the raw tokens corrupted (T5)
    span_mean_length: float = 3.0  # span: mean length of a corrupted span (T5)
    ul2_r_rate: float = 0.4  # ul2: share of samples from the R denoisers (mean span 3 and 8, density 0.15)
    ul2_x_rate: float = 0.4  # ul2: X denoisers (mean span 3, 8 at density 0.5; 64 at 0.15 and 0.5)
    ul2_s_rate: float = 0.2  # ul2: the S denoiser (the encoder reads a prefix, the decoder continues it)


@dataclass
class ResilienceConfig:
    """Guards of a long run (engine.training.guards)."""

    on_nan: Literal["skip", "rollback", "stop"] = "skip"  # a step with a non-finite gradient norm: skip its update,
    # roll back to the last checkpoint and skip its batch, or stop the run (the last checkpoint kept)
    hang_timeout: float = 0.0  # watchdog: a step may take max(this, hang_factor x median step time) s; 0: off
    hang_factor: float = 10.0
    first_step_timeout: float = 600.0  # the limit of the first steps (compilation) and of evaluations and saves
    pg_timeout: float = 600.0  # process-group collective timeout, s
    spike_factor: float = 3.0  # loss spikes: above Q3 + factor x IQR of the last spike_window losses; 0: off
    spike_window: int = 50
    straggler_every: int = 0  # gather per-rank step-time percentiles every N steps and name slow ranks; 0: off
    straggler_threshold: float = 1.5  # a rank whose median step time exceeds this x the ranks' median is slow
    health_every: int = 100  # GPU health (NVML) sampled every N steps when NVML is present; 0: off


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    resume: str = "auto"  # auto | never | PATH to a checkpoint directory

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                out[f.name] = {_key_name(g.name): getattr(value, g.name) for g in dataclasses.fields(value)}
            else:
                out[f.name] = value
        return out

    def to_toml(self) -> str:
        """The resolved config as TOML; `load_config(["--config", file])` reads it back to an equal Config."""
        d = self.to_dict()
        lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
        for section, values in d.items():
            if isinstance(values, dict):
                lines.append(f"\n[{section}]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        return "\n".join(lines) + "\n"


def _key_name(field_name: str) -> str:
    """Field `async_` is the key `async` (a Python keyword cannot be a field name)."""
    return field_name[:-1] if field_name.endswith("_") else field_name


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def _fields_by_key(obj: Any) -> dict[str, dataclasses.Field]:
    return {_key_name(f.name): f for f in dataclasses.fields(obj)}


def _unknown(kind: str, key: str, known: typing.Iterable[str]) -> ConfigError:
    known = sorted(known)
    guess = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean '{guess[0]}'?" if guess else f"; known: {', '.join(known)}"
    return ConfigError(f"unknown config {kind} '{key}'{hint}")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Converts a TOML value or a flag's string to the field's type, or raises a one-line ConfigError."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{name} must be one of {'|'.join(choices)}, got '{value}'")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{name} takes true or false, got '{value}'")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} takes an integer, got '{value}'")
        if isinstance(value, int):
            return value
        try:
            return int(str(value), 0)
        except ValueError:
            raise ConfigError(f"{name} takes an integer, got '{value}'") from None
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(str(value))
        except ValueError:
            raise ConfigError(f"{name} takes a number, got '{value}'") from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name} takes a string, got {type(value).__name__}")
        return str(value)
    raise TypeError(f"config field {name} has unsupported type {hint}")  # a bug in this file, not user input


def _set(cfg: Config, dotted: str, value: Any) -> None:
    section_name, _, key = dotted.partition(".")
    top = _fields_by_key(cfg)
    if section_name not in top:
        raise _unknown("section", section_name, top)
    section = getattr(cfg, section_name)
    if not dataclasses.is_dataclass(section):
        if key:
            raise ConfigError(f"'{section_name}' is not a section; use --{section_name} VALUE")
        hints = typing.get_type_hints(Config)
        setattr(cfg, section_name, _coerce(section_name, value, hints[section_name]))
        return
    if not key:
        raise ConfigError(f"'{section_name}' is a section; name a key, e.g. --{section_name}.KEY VALUE")
    fields = _fields_by_key(section)
    if key not in fields:
        raise _unknown("key", f"{section_name}.{key}", [f"{section_name}.{k}" for k in fields])
    f = fields[key]
    hints = typing.get_type_hints(type(section))
    setattr(section, f.name, _coerce(dotted, value, hints[f.name]))


def _apply_mapping(cfg: Config, data: dict[str, Any], source: str) -> None:
    for name, value in data.items():
        if isinstance(value, dict):
            for key, v in value.items():
                try:
                    _set(cfg, f"{name}.{key}", v)
                except ConfigError as e:
                    raise ConfigError(f"{source}: {e}") from None
        else:
            try:
                _set(cfg, name, value)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory, not a TOML file")
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None


def load_config(argv: list[str] | None = None) -> Config:
    """Builds a Config from defaults, then `--config FILE.toml`, then `--section.key value` flags in order.

    Flags may be written `--key value` or `--key=value`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument '{arg}'; flags look like --section.key value")
        name = arg[2:]
        if "=" in name:
            name, value = name.split("=", 1)
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"flag --{name} needs a value")
            if argv[i + 1].startswith("--") and len(argv[i + 1]) > 2:  # a value never starts with --: a flag does
                raise ConfigError(f"flag --{name} needs a value, got the flag {argv[i + 1]} instead")
            i += 1
            value = argv[i]
        pairs.append((name, value))
        i += 1

    cfg = Config()
    for name, value in pairs:
        if name == "config":
            _apply_mapping(cfg, load_toml(value), value)
    for name, value in pairs:
        if name != "config":
            try:
                _set(cfg, name, value)
            except ConfigError as e:
                raise ConfigError(f"--{name}: {e}") from None
    return cfg
