"""What a resumed run may change: the newest checkpoint's saved config against the new one.

    applied = check_resume(run_dir, cfg)   # before any rank starts; ConfigError if refused

A change that would make the checkpoint mean something else (another model, layout, data set,
random stream or optimizer state) is refused with the key, both values and the reason; start a
new run to make it. Keys that only matter for a fresh run (initial weights, the SFT warm-up)
are ignored. Every other change (train_steps, learning rate, loss knobs, sampling, logging,
checkpointing, evaluation, the layer spec and sequence parallelism: the checkpoint's keys are the
same under both specs) is applied from the resumed step on and listed in the returned lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from megatron_rpg.config import ConfigError, RunConfig, config_to_dict
from megatron_rpg.run.run_dir import MARKER, complete_checkpoints

REFUSED = {
    "seed": "the run's random streams (sampling, data order) derive from it",
    "model.hf_config": "the checkpoint holds this model's weights",
    "model.tokenizer": "the checkpoint holds this model's weights",
    "model.params_dtype": "the checkpoint holds this model's weights",
    "parallel.tensor_parallel": "the checkpoint's RNG states are per rank of this layout",
    "parallel.pipeline_parallel": "the checkpoint's RNG states are per rank of this layout",
    "parallel.virtual_pipeline_parallel": "the checkpoint holds one state per model chunk",
    "data.task": "the saved data position counts prompts of this data set",
    "data.train_path": "the saved data position counts prompts of this data set",
    "data.max_operand": "the saved data position counts prompts of this data set",
    "data.operators": "the saved data position counts prompts of this data set",
    "data.prompt_key": "the saved data position counts prompts of this data set",
    "data.answer_key": "the saved data position counts prompts of this data set",
    "loss.kl_anchor": "the checkpoint holds a reference model only with kl_anchor 'ref'",
    "optimizer.adam_beta1": "it is part of the checkpoint's optimizer state",
    "optimizer.adam_beta2": "it is part of the checkpoint's optimizer state",
    "optimizer.adam_eps": "it is part of the checkpoint's optimizer state",
}
IGNORED = {
    "model.checkpoint": "initial weights of a fresh run",
    "sft": "the warm-up runs on a fresh model only",
    "checkpoint.resume": "how this run was started",
    "checkpoint.stop_after_minutes": "how long this job may run",
}


def _rule(key: str, rules: dict[str, str]) -> str | None:
    for prefix, reason in rules.items():
        if key == prefix or key.startswith(prefix + "."):
            return reason
    return None


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else key
        flat.update(_flatten(value, name) if isinstance(value, dict) else {name: value})
    return flat


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of the run (resume verifies its checksums later)."""
    complete = complete_checkpoints(Path(run_dir) / "checkpoints")
    return complete[-1] if complete else None


def check_resume(run_dir: str | Path, cfg: RunConfig) -> list[str]:
    """Compare `cfg` with the config saved in the run's newest checkpoint: raise ConfigError
    naming a refused change, else return one line per applied or ignored change."""
    checkpoint = newest_checkpoint(run_dir)
    if checkpoint is None:
        return []
    saved_path = checkpoint / "config.yaml"
    try:
        saved = _flatten(yaml.safe_load(saved_path.read_text()) or {})
        step = int((checkpoint / MARKER).read_text())
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ConfigError("--resume", str(checkpoint), f"a readable checkpoint ({err})") from None
    if cfg.train_steps < step:
        raise ConfigError("train_steps", cfg.train_steps, f">= {step}, the step of {checkpoint}")
    new = _flatten(config_to_dict(cfg))
    changed = [k for k in new if k in saved and saved[k] != new[k]]
    lines, refused = [], []
    for key in changed:
        ignored = _rule(key, IGNORED)
        reason = None if ignored else _rule(key, REFUSED)
        change = f"{key}: {saved[key]!r} -> {new[key]!r}"
        if reason:
            refused.append((key, reason))
        else:
            lines.append(f"{change} ({'ignored: ' + ignored if ignored else 'applied'})")
    if refused:
        key, reason = refused[0]
        others = f"; also refused: {', '.join(k for k, _ in refused[1:])}" if refused[1:] else ""
        raise ConfigError(
            key,
            new[key],
            f"{saved[key]!r} as saved in {saved_path} ({reason}); start a new run "
            f"to change it{others}",
        )
    return lines
