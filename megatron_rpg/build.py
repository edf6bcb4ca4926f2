"""A run's parts from its config: the model's Hugging Face config, the tokenizer, the policy in
Megatron DDP and the reference model, the optimizer and its LR schedule. Each builder takes what
it needs, not the trainer, and names the config key of anything it refuses (ConfigError).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_rpg.checkpoint.mcore import load_mcore
from megatron_rpg.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RunConfig,
)
from megatron_rpg.data import ArithmeticTask, MathDataset, Task
from megatron_rpg.models import ModelArch, ReferenceModel, build_model_chunks
from megatron_rpg.models.arch import read_hf_config
from megatron_rpg.models.builder import resolve_dtype
from megatron_rpg.rollout.placement import rollout_placement
from megatron_rpg.tokenizer import HFTokenizer, Tokenizer, load_tokenizer, train_sentencepiece


def model_hf_config(path: str) -> dict[str, Any]:
    """model.hf_config's config.json, or a one-line error naming the key."""
    allowed = "a config.json file or a directory holding one"
    if not path:
        raise ConfigError("model.hf_config", path, allowed)
    try:
        return read_hf_config(path)
    except FileNotFoundError:
        raise ConfigError("model.hf_config", path, allowed) from None


def build_task(data: DataConfig) -> ArithmeticTask | MathDataset:
    """The training task that `data` describes (data.task: arithmetic or math)."""
    if data.task == "arithmetic":
        return ArithmeticTask(data.max_operand, data.operators)
    return MathDataset(
        data.train_path,
        data.prompt_key,
        data.answer_key,
        data.answer_extraction,
        data.prompt_template,
    )


def check_before_ranks(config: RunConfig, world_size: int) -> None:
    """What a launcher checks before it starts `world_size` ranks: the model's config and where
    the rollout engine runs (ConfigError naming the key)."""
    arch = ModelArch.from_hf(model_hf_config(config.model.hf_config))
    rollout_placement(config.rollout, arch, world_size, config.model.params_dtype)


def check_batch_layout(o: OptimizerConfig, data_parallel: int) -> None:
    """A mini-batch splits evenly into micro-batches on every data-parallel rank."""
    if o.mini_batch_size % (o.micro_batch_size * data_parallel):
        raise ConfigError(
            "optimizer.mini_batch_size",
            o.mini_batch_size,
            f"a multiple of micro_batch_size x data-parallel ranks "
            f"({o.micro_batch_size} x {data_parallel})",
        )


def build_tokenizer(
    config: RunConfig, task: Task, vocab_size: int, run_dir: Path
) -> Tokenizer | HFTokenizer:
    """model.tokenizer (a directory or a tokenizer.model), else the tokenizer files of
    model.checkpoint; the arithmetic task trains its own into the run directory (rank 0, the
    others wait). Collective. Refuses a tokenizer larger than the model's vocabulary."""
    c, chat = config, config.data.chat_template
    if c.model.tokenizer:
        path = Path(c.model.tokenizer)
        tokenizer = load_tokenizer(path, chat) if path.is_dir() else Tokenizer(path, chat)
    elif c.model.checkpoint and isinstance(task, MathDataset):
        tokenizer = load_tokenizer(c.model.checkpoint, chat)
    elif isinstance(task, ArithmeticTask):
        path = run_dir / "tokenizer.model"
        if dist.get_rank() == 0 and not path.is_file():
            # digits and operators are single pieces (numbers spelled digit by digit); "=" is
            # left to the unigram model, which needs at least one ordinary character
            symbols = list("0123456789" + c.data.operators)
            train_sentencepiece(task.corpus(), path, vocab_size, symbols)
        dist.barrier()
        tokenizer = Tokenizer(path, chat)
    else:
        raise ConfigError(
            "model.tokenizer",
            "",
            "a tokenizer directory or tokenizer.model "
            "(or model.checkpoint with tokenizer files) for data.task=math",
        )
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(
            "model.tokenizer",
            str(tokenizer.path),
            f"a tokenizer of at most the model's vocab_size ({vocab_size}); "
            f"it has {tokenizer.vocab_size}",
        )
    return tokenizer


def wrap_ddp(chunks: list[Any]) -> list[Any]:
    """Megatron DDP around each chunk, with finalize_model_grads wired in (without it data-
    parallel replicas silently diverge: docs/install.md)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=torch.cuda.is_available()
    )
    return [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def make_optimizer(policy: list[Any], o: OptimizerConfig, lr: float, weight_decay: float) -> Any:
    """Megatron's Adam(W) over the DDP-wrapped chunks, in their parameter dtype (bf16: fp32
    master weights); distributed (sharded state) with CUDA."""
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer

    dtype = policy[0].config.params_dtype
    return get_megatron_optimizer(
        MegatronOptimizerConfig(
            optimizer="adam",
            lr=lr,
            weight_decay=weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=dtype == torch.bfloat16,
            fp16=False,
            params_dtype=dtype,
            use_distributed_optimizer=torch.cuda.is_available(),
        ),
        policy,
    )


def make_scheduler(optimizer: Any, o: OptimizerConfig, train_steps: int) -> Any:
    """Linear warm-up over o.warmup_steps RL steps, then the constant o.lr (spec section 9)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=max(train_steps, o.warmup_steps + 1),
        lr_decay_style="constant",
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(train_steps, 1),
        wd_incr_style="constant",
        override_opt_param_scheduler=True,  # on resume the config's values apply
        use_checkpoint_opt_param_scheduler=False,
    )


class LRSchedule:
    """Megatron's scheduler (make_scheduler) as a checkpoint component: resumed, its counters are
    the saved ones and the configured `lr` applies from there (the saved param groups carry the
    saved LR)."""

    def __init__(self, scheduler: Any, optimizer: Any, lr: float):
        self.scheduler, self.optimizer, self.lr = scheduler, optimizer, lr

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)
        for group in self.optimizer.param_groups:
            group["max_lr"] = group["min_lr"] = self.lr


def build_models(
    arch: ModelArch, model: ModelConfig, parallel: ParallelConfig, with_reference: bool
) -> tuple[list[Any], ReferenceModel | None]:
    """The policy's chunks (model.checkpoint loaded, DDP-wrapped) and, with `with_reference`,
    the frozen reference model, a copy of the policy."""
    dtype = resolve_dtype(model.params_dtype)
    chunks = build_model_chunks(arch, parallel, dtype, layer_spec=model.layer_spec)
    if model.checkpoint:
        load_mcore(chunks, model.checkpoint)
    policy = wrap_ddp(chunks)
    if not with_reference:
        return policy, None
    reference = build_model_chunks(arch, parallel, dtype, layer_spec=model.layer_spec)
    return policy, ReferenceModel(reference, policy)
