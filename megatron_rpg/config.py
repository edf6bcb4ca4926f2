"""Typed configuration of a run: dataclasses loaded from YAML with `key=value` overrides.

    cfg = load_config("examples/tiny_cpu.yaml", ["loss.beta=0.001", "parallel.tensor_parallel=2"])

Every field is type-checked on load; unknown keys and invalid values raise `ConfigError`, whose
message names the key, the value and what is allowed. Range checks live in each section's
`__post_init__`, so a section built in code is validated the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# ConfigError and LossConfig are re-exported: a run's config is where users look for them
from megatron_rpg.config_schema import ConfigError as ConfigError
from megatron_rpg.config_schema import Section, build, check
from megatron_rpg.losses import LOSSES
from megatron_rpg.losses.config import LossConfig as LossConfig


@dataclass
class ModelConfig(Section):
    """Policy architecture: a Hugging Face config.json (file or directory); initial weights from
    a Megatron checkpoint (`megatron-rpg convert hf-to-mcore`), or random then the SFT warm-up;
    tokenizer: a sentencepiece model file (empty: trained into the run directory from the task's
    text, for the embedded task)."""

    hf_config: str = ""
    checkpoint: str = ""
    tokenizer: str = ""
    params_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: fp32 on CPU, bf16 on GPU
    # auto: Transformer Engine's with CUDA and TE, else Megatron's local; te on the CPU: stand-ins
    # with TE's module names (models/builder.py)
    layer_spec: Literal["auto", "te", "local"] = "auto"


@dataclass
class ParallelConfig(Section):
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_parallel: int = 1
    sequence_parallel: bool = False
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl with CUDA, else gloo
    timeout_minutes: int = 30
    recompute_activations: bool = False  # full recompute: keep only each layer's input

    def validate(self) -> None:
        for name in ("tensor_parallel", "pipeline_parallel", "virtual_pipeline_parallel"):
            check(name, getattr(self, name), getattr(self, name) >= 1, "an integer >= 1")
        check(
            "sequence_parallel",
            self.sequence_parallel,
            not self.sequence_parallel or self.tensor_parallel > 1,
            "true only with tensor_parallel > 1",
        )
        check("timeout_minutes", self.timeout_minutes, self.timeout_minutes >= 1, ">= 1")


@dataclass
class RolloutConfig(Section):
    engine: Literal["embedded", "vllm"] = "embedded"
    n: int = 8  # responses per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    max_tokens: int = 256
    tensor_parallel: int = 1  # the engine's own TP, independent of the trainer's
    gpu_memory_utilization: float = 0.35  # vLLM's share of each of its GPUs
    engine_nodes: int = 0  # 0: vLLM colocated on the trainer's GPUs; N: a server on each of N nodes
    server_url: str = ""  # running `vllm serve`s, comma-separated (engine_nodes: set by slurm/)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # vLLM's weights; auto: the trainer's
    weight_transfer: Literal["auto", "mrpg_local", "nccl", "mrpg_gloo"] = "auto"
    # served over mrpg_gloo: every N-th sync is full, those between send only what changed
    full_sync_every: int = 1
    sync_bucket_mb: int = 512  # the weight sync's bucket (MiB); the launch plan accounts for it
    kv_cache_gb: float = 1.0  # vLLM's KV cache per engine on CPUs (GPUs: gpu_memory_utilization)
    request_timeout_s: float = 600.0  # per request to a vllm serve, and its weight transfer
    request_retries: int = 2  # then the step fails with the server named

    def validate(self) -> None:
        check("n", self.n, self.n >= 1, "an integer >= 1")
        check("temperature", self.temperature, self.temperature > 0, "> 0")
        check("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]")
        check("top_k", self.top_k, self.top_k >= 0, ">= 0 (0 disables it)")
        check("max_tokens", self.max_tokens, self.max_tokens >= 1, ">= 1")
        check("tensor_parallel", self.tensor_parallel, self.tensor_parallel >= 1, ">= 1")
        check("engine_nodes", self.engine_nodes, self.engine_nodes >= 0, ">= 0")
        check("full_sync_every", self.full_sync_every, self.full_sync_every >= 1, ">= 1")
        check("sync_bucket_mb", self.sync_bucket_mb, self.sync_bucket_mb >= 1, ">= 1")
        for url in self.server_url.split(",") if self.server_url else []:
            check(
                "server_url",
                self.server_url,
                url.strip().startswith(("http://", "https://")),
                "http(s)://host:port of each vllm serve, comma-separated",
            )
        check(
            "gpu_memory_utilization",
            self.gpu_memory_utilization,
            0 < self.gpu_memory_utilization < 1,
            "in (0, 1)",
        )
        check("kv_cache_gb", self.kv_cache_gb, self.kv_cache_gb > 0, "> 0")
        check("request_timeout_s", self.request_timeout_s, self.request_timeout_s > 0, "> 0")
        check("request_retries", self.request_retries, self.request_retries >= 0, ">= 0")


@dataclass
class AlgorithmConfig(Section):
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
        check("loss", self.loss, self.loss in LOSSES, f"one of {sorted(LOSSES)}")
        check("kl_in_reward", self.kl_in_reward, self.kl_in_reward >= 0, ">= 0")
        check("ppo_epochs", self.ppo_epochs, self.ppo_epochs >= 1, ">= 1")
        check(
            "ref_update_interval",
            self.ref_update_interval,
            self.ref_update_interval >= 0,
            ">= 0 (0: never)",
        )
        check(
            "dynamic_sampling_max_rounds",
            self.dynamic_sampling_max_rounds,
            self.dynamic_sampling_max_rounds >= 1,
            ">= 1",
        )
        check("overlong_buffer", self.overlong_buffer, self.overlong_buffer >= 0, ">= 0")
        check("overlong_penalty", self.overlong_penalty, self.overlong_penalty >= 0, ">= 0")
        check(
            "incorrect_reward",
            self.incorrect_reward,
            self.incorrect_reward < 1,
            "< 1 (the reward of a right answer)",
        )
        check(
            "ref_update_kl_target",
            self.ref_update_kl_target,
            self.ref_update_kl_target >= 0,
            ">= 0",
        )


@dataclass
class DataConfig(Section):
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
        check("max_operand", self.max_operand, self.max_operand >= 1, ">= 1")
        known = bool(self.operators) and set(self.operators) <= set("+-*")
        check("operators", self.operators, known, "characters of '+-*'")
        check("prompts_per_step", self.prompts_per_step, self.prompts_per_step >= 1, ">= 1")
        check("max_prompt_tokens", self.max_prompt_tokens, self.max_prompt_tokens >= 1, ">= 1")
        check(
            "train_path",
            self.train_path,
            self.task != "math" or bool(self.train_path),
            "a JSON lines file for task 'math'",
        )


@dataclass
class SFTConfig(Section):
    """Supervised warm-up run by `train` before RL on a fresh model (steps=0: none). On the
    arithmetic task each example's answer is right with probability correct_fraction, else a
    random number of the answer range (see data/arithmetic.py)."""

    steps: int = 0
    lr: float = 1e-3
    batch_size: int = 64
    correct_fraction: float = 1.0

    def validate(self) -> None:
        check("steps", self.steps, self.steps >= 0, ">= 0")
        check("lr", self.lr, self.lr > 0, "> 0")
        check("batch_size", self.batch_size, self.batch_size >= 1, ">= 1")
        check(
            "correct_fraction", self.correct_fraction, 0 <= self.correct_fraction <= 1, "in [0, 1]"
        )


@dataclass
class OptimizerConfig(Section):
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
    # a token-separable loss's gradients through the output layer in the forward pass, chunk by
    # chunk (no recompute of the logits in backward; forward_backward.py); off: the recompute path
    loss_in_forward: bool = True

    def validate(self) -> None:
        check("lr", self.lr, self.lr > 0, "> 0")
        check("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0")
        check("clip_grad", self.clip_grad, self.clip_grad >= 0, ">= 0 (0 disables)")
        check("warmup_steps", self.warmup_steps, self.warmup_steps >= 0, ">= 0")
        for name in ("adam_beta1", "adam_beta2"):
            check(name, getattr(self, name), 0 <= getattr(self, name) < 1, "in [0, 1)")
        check("adam_eps", self.adam_eps, self.adam_eps > 0, "> 0")
        check("micro_batch_size", self.micro_batch_size, self.micro_batch_size >= 1, ">= 1")
        check(
            "mini_batch_size",
            self.mini_batch_size,
            self.mini_batch_size >= self.micro_batch_size
            and self.mini_batch_size % self.micro_batch_size == 0,
            f"a multiple of micro_batch_size ({self.micro_batch_size})",
        )


@dataclass
class LoggingConfig(Section):
    run_dir: str = "runs/default"
    tensorboard: bool = False  # needs the tensorboard package
    wandb_project: str = ""  # empty: no wandb
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"


@dataclass
class CheckpointConfig(Section):
    save_interval: int = 0  # steps between checkpoints; 0: only at the end
    keep_last: int = 2
    resume: bool = False
    verify_checksums: bool = True  # sha256 of every file, checked on resume
    # save and stop before a step (and its save) that would end later than this many minutes
    # after the process started, estimated from the longest step and save so far; 0: off.
    # slurm/common.sh sets it from the job's time left (a TIMEOUT job is not requeued).
    stop_after_minutes: float = 0.0
    # a host copy of the weights and optimizer state before each update, so that a signal
    # between its optimizer steps abandons the step (host memory: that state, per rank)
    stop_in_update: bool = True

    def validate(self) -> None:
        check("save_interval", self.save_interval, self.save_interval >= 0, ">= 0")
        check("keep_last", self.keep_last, self.keep_last >= 1, ">= 1")
        check("stop_after_minutes", self.stop_after_minutes, self.stop_after_minutes >= 0, ">= 0")


# advantage estimators whose baseline is the prompt's group of responses (losses/advantages.py)
GROUP_ESTIMATORS = ("group_mean", "group_mean_std", "group_mean_whitened")


@dataclass
class RunConfig(Section):
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
        check("train_steps", self.train_steps, self.train_steps >= 1, ">= 1")
        check("seed", self.seed, self.seed >= 0, ">= 0")
        check("eval_interval", self.eval_interval, self.eval_interval >= 0, ">= 0")
        check("eval_k", self.eval_k, self.eval_k >= 1, ">= 1")
        check("eval_limit", self.eval_limit, self.eval_limit >= 0, ">= 0")
        from megatron_rpg.data.benchmarks import BENCHMARKS

        unknown = [
            b
            for b in self.eval_benchmarks.split(",")
            if b and b not in BENCHMARKS and not b.endswith(".jsonl")
        ]
        check(
            "eval_benchmarks",
            self.eval_benchmarks,
            not unknown,
            f"comma-separated names of {sorted(BENCHMARKS)} or .jsonl files",
        )
        check(
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
                check(
                    f"algorithm.{key}",
                    value,
                    value == default,
                    f"{default} with loss.kl_anchor 'old' (the KL is to pi_old, renewed every "
                    "step: this knob would do nothing); loss.kl_anchor=ref for a reference "
                    "model",
                )
        from megatron_rpg.losses.rpg import kl_inside_clip

        check(
            "loss.rollout_is_on_kl",
            self.loss.rollout_is_on_kl,
            self.loss.rollout_is_on_kl or not kl_inside_clip(self.algorithm.loss, self.loss.clip),
            f"true with algorithm.loss {self.algorithm.loss!r} and loss.clip "
            f"{self.loss.clip!r}: its KL is inside the clip, so the weight cannot leave it out",
        )
        grouped = self.algorithm.advantage in GROUP_ESTIMATORS
        check(
            "rollout.n",
            self.rollout.n,
            not grouped or self.rollout.n >= 2,
            f">= 2 with algorithm.advantage {self.algorithm.advantage!r} (a group's baseline is "
            "its own mean: one response per prompt has advantage 0 and nothing is learned); "
            "batch_mean or reinforce_pp for one response per prompt",
        )
        check(
            "sft.steps",
            self.sft.steps,
            self.sft.steps == 0 or self.data.task == "arithmetic",
            "0 with data.task 'math' (the warm-up writes the arithmetic task's answers; start "
            "math from a pretrained model.checkpoint)",
        )
        sequences = self.data.prompts_per_step * self.rollout.n
        check(
            "optimizer.mini_batch_size",
            self.optimizer.mini_batch_size,
            sequences % self.optimizer.mini_batch_size == 0,
            f"a divisor of data.prompts_per_step x rollout.n ({sequences})",
        )
        updates = self.optimizer_steps_per_step()
        check(
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
        return self.algorithm.ppo_epochs * (sequences // self.optimizer.mini_batch_size)


# --------------------------------------------------------------------------- loading


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
    return build(RunConfig, data)


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
