"""Rank functions for tests/test_trainer.py: short runs of the trainer on pool ranks."""

import contextlib
import io
import math

import torch

from megatron_rpg.config import load_config


def short_run(config_path, overrides):
    """Train; rank 0 returns the metrics history, other ranks None."""
    import torch.distributed as dist

    from megatron_rpg.parallel import destroy_model_parallel
    from megatron_rpg.trainer import run_training

    history = run_training(load_config(config_path, overrides))
    destroy_model_parallel()
    return history if dist.get_rank() == 0 else None


def non_finite_step_is_skipped(config_path, overrides):
    """Step 2's loss is multiplied by nan: no parameter may change in that step."""
    from megatron_rpg.parallel import destroy_model_parallel
    from megatron_rpg.trainer import Trainer

    trainer = Trainer(load_config(config_path, overrides))
    honest = trainer.losses

    def poisoned(mini):
        inner, inner_terms = honest(mini)
        factor = math.nan if trainer.counters.step == 1 else 1.0

        def loss(lp, entropy, micro):
            value, metrics = inner(lp, entropy, micro)
            return value * factor, metrics

        def token_loss(micro):  # the fused path takes its gradients from these
            terms = inner_terms(micro)
            return lambda lp, entropy, rows: terms(lp, entropy, rows) * factor

        return loss, token_loss if inner_terms is not None else None

    trainer.losses = poisoned
    snapshot = lambda: [p.detach().clone() for m in trainer.policy for p in m.parameters()]  # noqa: E731
    trainer.train_step()
    before = snapshot()
    trainer.train_step()  # poisoned
    after_skip = snapshot()
    trainer.train_step()
    after = snapshot()
    destroy_model_parallel()
    return {
        "skipped": trainer.counters.skipped_steps,
        "unchanged": all(torch.equal(a, b) for a, b in zip(before, after_skip, strict=True)),
        "moved_after": not all(torch.equal(a, b) for a, b in zip(after_skip, after, strict=True)),
        "finite": all(bool(torch.isfinite(p).all()) for p in after),
    }


def dynamic_sampling_rollouts(config_path, overrides):
    """Two DAPO rollouts: per group whether its rewards vary, the metrics, the data position."""
    from megatron_rpg.parallel import destroy_model_parallel
    from megatron_rpg.trainer import Trainer

    trainer = Trainer(load_config(config_path, overrides))
    out = []
    for _ in range(2):
        collected = trainer.rl_step.collect()
        batch, metrics = collected.batch, collected.metrics
        trainer.counters.data_position = collected.position  # as a step does
        varied = [
            len(set(batch.rewards[batch.group_ids == g].tolist())) > 1
            for g in range(int(batch.group_ids.max()) + 1)
        ]
        out.append((varied, metrics, trainer.counters.data_position, batch.rewards.tolist()))
    destroy_model_parallel()
    return out


def whiten_halves(values, mask):
    """Each of two ranks whitens its half of the rows over the whole group."""
    import torch.distributed as dist

    from megatron_rpg.losses.advantages import whiten

    rank = dist.get_rank()
    half = slice(rank * len(values) // 2, (rank + 1) * len(values) // 2)
    return whiten(values[half], mask[half], group=dist.group.WORLD)


def signal_during_step_3(config_path, overrides, run_dir, where):
    """A signal arrives while step 3's responses are sampled (`where` = "rollout"), in the
    first of its two log-prob passes ("logprob pass"), in the second ("last logprob pass":
    seen before the update), or in its update's first optimizer step of two ("update"): the
    run abandons that step, keeps its checkpoint of step 2 and stops; resumed, it ends as an
    uninterrupted run. Rank 0 returns (uninterrupted history, the stopped run's, the resumed
    run's, the stop's message); the others None."""
    import torch.distributed as dist

    from megatron_rpg.parallel import destroy_model_parallel
    from megatron_rpg.run.preemption import StopSignals
    from megatron_rpg.step import update
    from megatron_rpg.trainer import Trainer, run_training

    whole = run_training(load_config(config_path, [*overrides, f"logging.run_dir={run_dir}/a"]))
    destroy_model_parallel()
    stopped_config = load_config(config_path, [*overrides, f"logging.run_dir={run_dir}/b"])
    trainer = Trainer(stopped_config)
    stop = StopSignals()
    owner, name, nth = {
        "rollout": (trainer.rollout, "generate", 1),
        "logprob pass": (update, "forward_backward", 1),
        "last logprob pass": (update, "forward_backward", 2),
        "update": (trainer.optimizer, "step", 1),
    }[where]
    original = getattr(owner, name)
    calls = []

    def then_signal(*args, **kwargs):
        out = original(*args, **kwargs)
        if trainer.counters.step == 2:
            calls.append(name)
            stop.received = len(calls) >= nth  # as the handler does on SIGUSR1
        return out

    setattr(owner, name, then_signal)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            stopped = trainer.train(stop)
    finally:
        setattr(owner, name, original)
        trainer.close()
    destroy_model_parallel()
    resumed = run_training(stopped_config, resume=True)
    destroy_model_parallel()
    return (whole, stopped, resumed, printed.getvalue()) if dist.get_rank() == 0 else None
