"""Typed configuration of a run: dataclasses loaded from YAML with `key=value` overrides.

    cfg = load_config("examples/tiny_cpu.yaml", ["loss.beta=0.001", "parallel.tensor_parallel=2"])

Every field is type-checked on load; unknown keys and invalid values raise `ConfigError`, whose
message names the key, the value and what is allowed. Range checks live in each section's
`__post_init__`, so a section built in code is validated the same way.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

UNBOUNDED = {"infinity": True}  # field metadata: a float field that may be .inf


class ConfigError(ValueError):
    """A config value is unknown or invalid; `key` is its dotted path (e.g. `loss.beta`)."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config key {key!r}: got {value!r}; allowed: {allowed}")

    def under(self, section: str) -> ConfigError:
        return ConfigError(
            f"{section}.{self.key}" if section else self.key, self.value, self.allowed
        )


def _check(key: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


class _Section:
    """Base of every config section: type-check all fields, then the section's own `validate`."""

    def __post_init__(self) -> None:
        _validate_fields(self)
        self.validate()

    def validate(self) -> None:
        """Range checks of the section; raise ConfigError naming the field."""


@dataclass
class ModelConfig(_Section):
    """Policy architecture: a Hugging Face config.json (file or directory); initial weights from
    a Megatron checkpoint (`megatron-rpg convert hf-to-mcore`), or random then the SFT warm-up;
    tokenizer: a sentencepiece model file (empty: trained into the run directory from the task's
    text, for the embedded task)."""

    hf_config: str = ""
    checkpoint: str = ""
    tokenizer: str = ""
    params_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: fp32 on CPU, bf16 on GPU


@dataclass
class ParallelConfig(_Section):
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_parallel: int = 1
    sequence_parallel: bool = False
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl with CUDA, else gloo
    timeout_minutes: int = 30
    recompute_activations: bool = False  # full recompute: keep only each layer's input

    def validate(self) -> None:
        for name in ("tensor_parallel", "pipeline_parallel", "virtual_pipeline_parallel"):
            _check(name, getattr(self, name), getattr(self, name) >= 1, "an integer >= 1")
        _check(
            "sequence_parallel",
            self.sequence_parallel,
            not self.sequence_parallel or self.tensor_parallel > 1,
            "true only with tensor_parallel > 1",
        )
        _check("timeout_minutes", self.timeout_minutes, self.timeout_minutes >= 1, ">= 1")


@dataclass
class RolloutConfig(_Section):
    engine: Literal["embedded", "vllm"] = "embedded"
    n: int = 8  # responses per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    max_tokens: int = 256
    tensor_parallel: int = 1  # the engine's own TP, independent of the trainer's
    gpu_memory_utilization: float = 0.35  # vLLM's share of each of its GPUs
    engine_nodes: int = 0  # 0: vLLM colocated on the trainer's GPUs; N: on N nodes of its own
    server_url: str = ""  # a running `vllm serve` (jobs with engine_nodes: $MRPG_ENGINE_URL)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # vLLM's weights; auto: the trainer's
    weight_transfer: Literal["auto", "mrpg_local", "nccl", "mrpg_gloo"] = "auto"
    kv_cache_gb: float = 1.0  # vLLM's KV cache per engine on CPUs (GPUs: gpu_memory_utilization)
    request_timeout_s: float = 600.0  # per request to a vllm serve, and its weight transfer
    request_retries: int = 2  # then the step fails with the server named

    def validate(self) -> None:
        _check("n", self.n, self.n >= 1, "an integer >= 1")
        _check("temperature", self.temperature, self.temperature > 0, "> 0")
        _check("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]")
        _check("top_k", self.top_k, self.top_k >= 0, ">= 0 (0 disables it)")
        _check("max_tokens", self.max_tokens, self.max_tokens >= 1, ">= 1")
        _check("tensor_parallel", self.tensor_parallel, self.tensor_parallel >= 1, ">= 1")
        _check("engine_nodes", self.engine_nodes, self.engine_nodes >= 0, ">= 0")
        _check(
            "gpu_memory_utilization",
            self.gpu_memory_utilization,
            0 < self.gpu_memory_utilization < 1,
            "in (0, 1)",
        )
        _check("kv_cache_gb", self.kv_cache_gb, self.kv_cache_gb > 0, "> 0")
        _check("request_timeout_s", self.request_timeout_s, self.request_timeout_s > 0, "> 0")
        _check("request_retries", self.request_retries, self.request_retries >= 0, ">= 0")


@dataclass
class LossConfig(_Section):
    """Knobs of the loss library (megatron_rpg.losses; spec sections 1-5, 8).

    beta: KL coefficient; clip: 'none', 'dual' (RPG-Style Clip / PPO dual-clip) or 'truncate'
    (truncated importance weight inside the stop-gradient, RPG-REINFORCE only); eps_low/eps_high:
    ratio clip range (1 - eps_low, 1 + eps_high); dual_clip_c: dual-clip bound c > 1 (inf disables);
    agg: aggregation over tokens; kl_anchor: 'old' (pi_ref = pi_old, the paper's iterative
    reference update) or 'ref' (a separate reference model); rollout_is: truncated importance
    sampling against the rollout engine's log-probs, per 'token' or 'sequence', capped at
    rollout_is_cap.
    """

    beta: float = 1e-4
    clip: Literal["none", "dual", "truncate"] = "dual"
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip_c: float = field(default=10.0, metadata=UNBOUNDED)
    agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = "token-mean"
    kl_anchor: Literal["old", "ref"] = "old"
    rollout_is: Literal["none", "token", "sequence"] = "none"
    rollout_is_cap: float = field(default=2.0, metadata=UNBOUNDED)

    def validate(self) -> None:
        _check("beta", self.beta, self.beta >= 0 and math.isfinite(self.beta), "finite, >= 0")
        _check("eps_low", self.eps_low, 0 <= self.eps_low < 1, "in [0, 1)")
        _check("eps_high", self.eps_high, self.eps_high >= 0, ">= 0")
        _check("dual_clip_c", self.dual_clip_c, self.dual_clip_c > 1, "> 1 (inf disables it)")
        _check("rollout_is_cap", self.rollout_is_cap, self.rollout_is_cap > 0, "> 0 (inf allowed)")


@dataclass
class AlgorithmConfig(_Section):
    loss: str = "rpg_reinforce_urkl"  # a name from megatron_rpg.losses.LOSSES
    advantage: Literal[
        "group_mean", "group_mean_std", "batch_mean", "group_mean_whitened", "reinforce_pp"
    ] = "group_mean"
    kl_in_reward: float = 0.0  # REINFORCE++: coefficient of the per-token KL in the reward
    ppo_epochs: int = 1
    # reference update every K optimizer steps, as the paper counts (spec section 6); 0: never.
    # A multiple of the optimizer steps per RL step: the step's reference log-probs are computed
    # once, before its update (as the authors' verl does with pi_old)
    ref_update_interval: int = 0
    ref_update_kl_target: float = 0.0  # 0: off; else update when the moving-average KL exceeds it
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, resample
    dynamic_sampling_max_rounds: int = 8  # then fill the batch with the dropped groups
    overlong_buffer: int = 0  # DAPO overlong shaping over the last N tokens of max_tokens; 0: off
    overlong_penalty: float = 1.0  # the shaping's largest penalty
    incorrect_reward: float = 0.0  # reward of a response graded wrong (right: 1); DAPO's scorer: -1

    def validate(self) -> None:
        from megatron_rpg.losses import LOSSES  # imported here: the loss library imports us

        _check("loss", self.loss, self.loss in LOSSES, f"one of {sorted(LOSSES)}")
        _check("kl_in_reward", self.kl_in_reward, self.kl_in_reward >= 0, ">= 0")
        _check("ppo_epochs", self.ppo_epochs, self.ppo_epochs >= 1, ">= 1")
        _check(
            "ref_update_interval",
            self.ref_update_interval,
            self.ref_update_interval >= 0,
            ">= 0 (0: never)",
        )
        _check(
            "dynamic_sampling_max_rounds",
            self.dynamic_sampling_max_rounds,
            self.dynamic_sampling_max_rounds >= 1,
            ">= 1",
        )
        _check("overlong_buffer", self.overlong_buffer, self.overlong_buffer >= 0, ">= 0")
        _check("overlong_penalty", self.overlong_penalty, self.overlong_penalty >= 0, ">= 0")
        _check(
            "incorrect_reward",
            self.incorrect_reward,
            self.incorrect_reward < 1,
            "< 1 (the reward of a right answer)",
        )
        _check(
            "ref_update_kl_target",
            self.ref_update_kl_target,
            self.ref_update_kl_target >= 0,
            ">= 0",
        )


@dataclass
class DataConfig(_Section):
    """task 'arithmetic': the embedded synthetic task (data/arithmetic.py; max_operand,
    operators); 'math': prompts and answers from the JSON lines file train_path, graded by
    math-verify on the Answer: line or last \\boxed{} (answer_extraction 'strict'), or else the
    last number of the response ('last_number', for models that state no answer); prompt_template
    'dapo' asks for that Answer: line, 'plain' is the problem alone. chat_template:
    prompts as the user's turn of the tokenizer's chat template ('auto': when it has one), in
    training, SFT and evaluation alike."""

    task: Literal["arithmetic", "math"] = "arithmetic"
    max_operand: int = 9
    operators: str = "+"
    train_path: str = ""
    prompt_key: str = "problem"
    answer_key: str = "answer"
    answer_extraction: Literal["strict", "last_number"] = "strict"
    prompt_template: Literal["dapo", "plain"] = "dapo"
    prompts_per_step: int = 8
    max_prompt_tokens: int = 512
    chat_template: Literal["auto", "on", "off"] = "auto"

    def validate(self) -> None:
        _check("max_operand", self.max_operand, self.max_operand >= 1, ">= 1")
        known = bool(self.operators) and set(self.operators) <= set("+-*")
        _check("operators", self.operators, known, "characters of '+-*'")
        _check("prompts_per_step", self.prompts_per_step, self.prompts_per_step >= 1, ">= 1")
        _check("max_prompt_tokens", self.max_prompt_tokens, self.max_prompt_tokens >= 1, ">= 1")
        _check(
            "train_path",
            self.train_path,
            self.task != "math" or bool(self.train_path),
            "a JSON lines file for task 'math'",
        )


@dataclass
class SFTConfig(_Section):
    """Supervised warm-up run by `train` before RL on a fresh model (steps=0: none). On the
    arithmetic task each example's answer is right with probability correct_fraction, else a
    random number of the answer range (see data/arithmetic.py)."""

    steps: int = 0
    lr: float = 1e-3
    batch_size: int = 64
    correct_fraction: float = 1.0

    def validate(self) -> None:
        _check("steps", self.steps, self.steps >= 0, ">= 0")
        _check("lr", self.lr, self.lr > 0, "> 0")
        _check("batch_size", self.batch_size, self.batch_size >= 1, ">= 1")
        _check(
            "correct_fraction", self.correct_fraction, 0 <= self.correct_fraction <= 1, "in [0, 1]"
        )


@dataclass
class OptimizerConfig(_Section):
    """AdamW with grad-norm clipping and linear warm-up then constant LR (spec section 9)."""

    lr: float = 1e-6
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    warmup_steps: int = 10
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    micro_batch_size: int = 4  # sequences per forward/backward
    mini_batch_size: int = 32  # sequences per optimizer step

    def validate(self) -> None:
        _check("lr", self.lr, self.lr > 0, "> 0")
        _check("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0")
        _check("clip_grad", self.clip_grad, self.clip_grad >= 0, ">= 0 (0 disables)")
        _check("warmup_steps", self.warmup_steps, self.warmup_steps >= 0, ">= 0")
        for name in ("adam_beta1", "adam_beta2"):
            _check(name, getattr(self, name), 0 <= getattr(self, name) < 1, "in [0, 1)")
        _check("adam_eps", self.adam_eps, self.adam_eps > 0, "> 0")
        _check("micro_batch_size", self.micro_batch_size, self.micro_batch_size >= 1, ">= 1")
        _check(
            "mini_batch_size",
            self.mini_batch_size,
            self.mini_batch_size >= self.micro_batch_size
            and self.mini_batch_size % self.micro_batch_size == 0,
            f"a multiple of micro_batch_size ({self.micro_batch_size})",
        )


@dataclass
class LoggingConfig(_Section):
    run_dir: str = "runs/default"
    tensorboard: bool = False  # needs the tensorboard package
    wandb_project: str = ""  # empty: no wandb
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"


@dataclass
class CheckpointConfig(_Section):
    save_interval: int = 0  # steps between checkpoints; 0: only at the end
    keep_last: int = 2
    resume: bool = False
    verify_checksums: bool = True  # sha256 of every file, checked on resume

    def validate(self) -> None:
        _check("save_interval", self.save_interval, self.save_interval >= 0, ">= 0")
        _check("keep_last", self.keep_last, self.keep_last >= 1, ">= 1")


@dataclass
class RunConfig(_Section):
    seed: int = 1234
    train_steps: int = 400
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval_interval: int = 0  # steps between greedy evaluations on the task; 0: none
    eval_benchmarks: str = ""  # also at those steps: comma-separated benchmarks (evaluation.py)
    eval_k: int = 4  # samples per benchmark problem
    eval_limit: int = 0  # first N problems of each benchmark; 0: all

    def validate(self) -> None:
        _check("train_steps", self.train_steps, self.train_steps >= 1, ">= 1")
        _check("seed", self.seed, self.seed >= 0, ">= 0")
        _check("eval_interval", self.eval_interval, self.eval_interval >= 0, ">= 0")
        _check("eval_k", self.eval_k, self.eval_k >= 1, ">= 1")
        _check("eval_limit", self.eval_limit, self.eval_limit >= 0, ">= 0")
        from megatron_rpg.evaluation import BENCHMARKS  # here: evaluation imports the rewards

        unknown = [
            b
            for b in self.eval_benchmarks.split(",")
            if b and b not in BENCHMARKS and not b.endswith(".jsonl")
        ]
        _check(
            "eval_benchmarks",
            self.eval_benchmarks,
            not unknown,
            f"comma-separated names of {sorted(BENCHMARKS)} or .jsonl files",
        )
        _check(
            "algorithm.overlong_buffer",
            self.algorithm.overlong_buffer,
            self.algorithm.overlong_buffer < self.rollout.max_tokens,
            f"< rollout.max_tokens ({self.rollout.max_tokens})",
        )
        if self.loss.kl_anchor == "old":  # the anchor is pi_old: no reference model to steer
            a = self.algorithm
            for key, value, default in (
                ("ref_update_interval", a.ref_update_interval, 0),
                ("ref_update_kl_target", a.ref_update_kl_target, 0.0),
                ("kl_in_reward", a.kl_in_reward, 0.0),
            ):
                _check(
                    f"algorithm.{key}",
                    value,
                    value == default,
                    f"{default} with loss.kl_anchor 'old' (the KL is to pi_old, renewed every "
                    "step: this knob would do nothing); loss.kl_anchor=ref for a reference "
                    "model",
                )
        sequences = self.data.prompts_per_step * self.rollout.n
        _check(
            "optimizer.mini_batch_size",
            self.optimizer.mini_batch_size,
            sequences % self.optimizer.mini_batch_size == 0,
            f"a divisor of data.prompts_per_step x rollout.n ({sequences})",
        )
        updates = self.optimizer_steps_per_step()
        _check(
            "algorithm.ref_update_interval",
            self.algorithm.ref_update_interval,
            self.algorithm.ref_update_interval % updates == 0,
            f"0 or a multiple of the optimizer steps per RL step ({updates} = ppo_epochs x "
            "prompts_per_step x rollout.n / mini_batch_size): the reference's log-probs are "
            "computed once per step",
        )

    def optimizer_steps_per_step(self) -> int:
        """Optimizer steps in one RL step: ppo_epochs x mini-batches of the step's sequences."""
        sequences = self.data.prompts_per_step * self.rollout.n
        return self.algorithm.ppo_epochs * max(sequences // self.optimizer.mini_batch_size, 1)


# --------------------------------------------------------------------------- loading


def _validate_fields(obj: Any) -> None:
    """Type-check a dataclass built in code (the loader coerces; this only checks)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = _coerce(f.name, getattr(obj, f.name), hints[f.name])
        if isinstance(value, float) and not f.metadata.get("infinity"):
            _check(f.name, value, math.isfinite(value), "a finite number")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"  # YAML 1.1 reads an unquoted on/off as a boolean
        _check(key, value, value in choices, f"one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if tp is bool:
        _check(key, value, isinstance(value, bool), "true or false")
        return value
    if tp is int:
        _check(key, value, isinstance(value, int) and not isinstance(value, bool), "an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(key, value, "a number") from None
        _check(
            key,
            value,
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and not math.isnan(value),
            "a number",
        )
        return float(value)
    if tp is str:
        _check(
            key,
            value,
            isinstance(value, str | int | float) and not isinstance(value, bool),
            "a string",
        )
        return str(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else _build(tp, value, key)
    raise TypeError(f"unsupported config type {tp!r} for {key!r}")


def _build(cls: Any, data: Any, prefix: str = "") -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix or "<root>", data, f"a mapping of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(
                _join(prefix, str(key)), data[key], f"a key of {cls.__name__}: {sorted(names)}"
            )
    kwargs = {k: _coerce(_join(prefix, k), v, hints[k]) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:  # raised by cls's own checks, with a key local to cls
        raise err.under(prefix) from None


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """['a.b=1', 'c=x'] -> {'a': {'b': 1}, 'c': 'x'}; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(item, item, "overrides of the form key=value, e.g. loss.beta=0.001")
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, raw, "a key path that does not pass through a value")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as err:
            raise ConfigError(key, raw, f"a YAML value ({_one_line(err)})") from None
    return tree


def _one_line(err: yaml.YAMLError) -> str:
    """A YAML error as 'problem at line L, column C' (PyYAML's own message spans lines)."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"{err.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(err).split())


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]  # stubs
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a RunConfig from a YAML file (or the defaults) and apply `key=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as err:
            allowed = f"a readable YAML file ({err.strerror})"
            raise ConfigError("--config", str(path), allowed) from None
        try:
            loaded = yaml.load(text, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as err:
            allowed = f"valid YAML ({_one_line(err)})"
            raise ConfigError(str(path), "<unparsable YAML>", allowed) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(str(path), loaded, "a YAML mapping at the top level")
        data = loaded or {}
    data = _merge(data, parse_overrides(overrides or []))
    return _build(RunConfig, data)


def check_input_paths(cfg: RunConfig) -> None:
    """Refuse, by key, a file or directory the run reads that does not exist (the launcher calls
    this before starting any rank)."""
    inputs = {
        "model.hf_config": cfg.model.hf_config,
        "model.checkpoint": cfg.model.checkpoint,
        "model.tokenizer": cfg.model.tokenizer,
        "data.train_path": cfg.data.train_path,
    }
    for key, path in inputs.items():
        if path and not Path(path).exists():
            raise ConfigError(key, path, "an existing path")
    for benchmark in cfg.eval_benchmarks.split(","):
        if benchmark.endswith(".jsonl") and not Path(benchmark).is_file():
            raise ConfigError("eval_benchmarks", benchmark, "an existing .jsonl file")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_yaml(cfg: RunConfig) -> str:
    """The fully resolved config as YAML; `load_config` of it reproduces `cfg`."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(config_yaml(cfg))
