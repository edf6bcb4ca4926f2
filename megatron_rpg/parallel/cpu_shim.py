"""Megatron-Core on a CPU-only torch, with gloo: every patch we need, in one place.

`apply()` patches once per process and only when CUDA is unavailable; on a GPU it does nothing.
Each patch names the megatron-core call site that needs it (0.16.1; the recipe and the failure
each patch prevents are in docs/install.md). Import it in every spawned rank:
patches are not inherited with the spawn start method.

Not covered (no CPU code path of ours uses them): the distributed optimizer's checkpoint resume
(patch 11 of the recipe) and batched p2p sync (we run pipelines with batch_p2p_comm=False).

Every `type: ignore` here marks a deliberate replacement of a torch or Megatron attribute
(method-assign, assignment): what a shim is; mypy rightly flags each one.
"""

from __future__ import annotations

import copy
import functools
import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch

_applied = False


def _quiet_expected_warnings() -> None:
    """Megatron warns at import that Transformer Engine and Apex are missing (never installed
    on CPUs) and that cuda_graph_scope 'full' is deprecated (no CUDA graphs on CPUs): nine lines
    on every rank's stderr that tell a CPU user nothing."""
    for message in (
        r"(Transformer Engine and )?Apex (are|is) not installed",
        r"full scope is deprecated",
    ):
        warnings.filterwarnings("ignore", message=message, category=UserWarning)


def apply() -> bool:
    """Patch megatron-core for the CPU; returns whether patches are (now) in place."""
    global _applied
    if torch.cuda.is_available():
        return False
    if not _applied:
        _patch_cuda_device_queries()
        _patch_rng()
        _patch_cuda_tensor_factories()
        _patch_cuda_type_checks()
        _patch_tied_embedding_sync()
        _patch_sequence_parallel_norm()
        _patch_missing_psutil()
        _quiet_expected_warnings()
        _applied = True
    return True


def _patch_cuda_device_queries() -> None:
    # param_and_grad_buffer.py (grad/param buffers), p2p recv buffers, GlobalMemoryBuffer,
    # ChainedOptimizer.get_loss_scale: device=torch.cuda.current_device(). "cpu", never 0 (cuda:0).
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]
    # p2p_communication._communicate with batch_p2p_sync, _communicate_shapes.
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]


def _patch_rng() -> None:
    """The CUDA RNG tracker (tensor_parallel/random.py) drives the CPU default generator instead.

    Redirecting get_rng_state alone is not enough: torch.cuda.manual_seed is silently queued on a
    CPU build, which would leave every tracker state identical and unseeded.
    """
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))  # type: ignore[assignment]
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()  # type: ignore[assignment]
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state  # type: ignore[assignment]
    mcore_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    mcore_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
        torch.set_rng_state(new_state)
    )

    class _DropCpuRngWarning(logging.Filter):
        # On the CPU the "CUDA" RNG *is* the CPU RNG, so the tracker warns on every dropout.
        def filter(self, record: logging.LogRecord) -> bool:
            return "CPU RNG state changed within GPU RNG context" not in record.getMessage()

    logging.getLogger(mcore_random.__name__).addFilter(_DropCpuRngWarning())


class _CudaToCpuTorch:
    """A stand-in for the `torch` module inside one megatron module: tensor factories asked for
    device="cuda" build on the CPU; everything else is the real torch."""

    _FACTORIES = ("zeros", "empty", "ones", "full", "tensor")

    def __init__(self, real: Any):
        self._real = real
        for name in self._FACTORIES:
            setattr(self, name, self._on_cpu(getattr(real, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    @staticmethod
    def _on_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        @functools.wraps(factory)
        def build(*args: Any, **kwargs: Any) -> torch.Tensor:
            device = kwargs.get("device")
            if device is not None and torch.device(device).type == "cuda":  # "cuda", 0, cuda:1
                kwargs["device"] = "cpu"
            kwargs.pop("pin_memory", None)
            return factory(*args, **kwargs)

        return build


def _patch_cuda_tensor_factories() -> None:
    # schedules.py total_num_tokens (3 schedules); FP32Optimizer._scale and MixedPrecisionOptimizer
    # buffers; clip_grads.py norm/overflow buffers; utils.local_multi_tensor_l2_norm.
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.pipeline_parallel import schedules

    for module in (schedules, optimizer, clip_grads, utils):
        module.torch = _CudaToCpuTorch(torch)  # type: ignore[attr-defined]


def _reporting_cuda_type_names(fn: Callable[..., Any]) -> Callable[..., Any]:
    """While `fn` runs, `tensor.type()` of a CPU tensor reports the torch.cuda.* name.
    Swaps a class attribute: not thread-safe (megatron calls these from one thread)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        original = torch.Tensor.type

        def cuda_type_name(self: torch.Tensor, dtype: Any = None, *a: Any, **k: Any) -> Any:
            if dtype is None and not a and not k and self.device.type == "cpu":
                return original(self).replace("torch.", "torch.cuda.", 1)
            return original(self, dtype, *a, **k)

        torch.Tensor.type = cuda_type_name  # type: ignore[method-assign,assignment]
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.type = original  # type: ignore[method-assign]

    return wrapper


def _patch_cuda_type_checks() -> None:
    from megatron.core.optimizer import distrib_optimizer, optimizer

    # clip_grads.clip_grad_by_total_norm_fp32 asserts grad.type() == 'torch.cuda.FloatTensor';
    # wrapped at its import site in optimizer.py.
    optimizer.clip_grad_by_total_norm_fp32 = _reporting_cuda_type_names(
        optimizer.clip_grad_by_total_norm_fp32
    )
    # DistributedOptimizer._build_model_and_main_param_groups accepts only torch.cuda.* params.
    cls = distrib_optimizer.DistributedOptimizer
    build = cls.__dict__["_build_model_and_main_param_groups"].__func__
    cls._build_model_and_main_param_groups = classmethod(_reporting_cuda_type_names(build))  # type: ignore[assignment]


def _patch_tied_embedding_sync() -> None:
    """LanguageModule.setup_embeddings_and_output_layer (tied embeddings with PP > 1) moves the
    weight with `.cuda()` before all-reducing it between the first and last stage. Not in the
    CPU recipe we started from (found with tied Qwen2 at PP=2): while it runs,
    `.cuda()` leaves tensors where they are."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    setup = LanguageModule.setup_embeddings_and_output_layer

    @functools.wraps(setup)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        original = torch.Tensor.cuda
        torch.Tensor.cuda = lambda tensor, *a, **k: tensor  # type: ignore[method-assign,assignment]
        try:
            return setup(self, *args, **kwargs)
        finally:
            torch.Tensor.cuda = original  # type: ignore[method-assign]

    LanguageModule.setup_embeddings_and_output_layer = wrapper  # type: ignore[method-assign]


def _patch_sequence_parallel_norm() -> None:
    """Without Apex/TE the local spec uses torch norms, whose wrapper refuses sequence parallel.

    Build the norm without SP and tag its parameters `sequence_parallel`, as FusedLayerNorm does,
    so that finalize_model_grads sums the norm's gradients over the TP group. (Dropping the assert
    without the tag trains silently wrong.)
    """
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    original_new = WrappedTorchNorm.__new__

    def new(cls: type, config: Any, *args: Any, **kwargs: Any) -> Any:
        if not config.sequence_parallel:
            return original_new(cls, config, *args, **kwargs)
        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = original_new(cls, plain, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    WrappedTorchNorm.__new__ = new  # type: ignore[method-assign,assignment]


def _patch_missing_psutil() -> None:
    # dist_checkpointing's async writer calls _process_memory() outside its try/except: without
    # psutil the writer process dies and save() hangs forever. psutil is a dependency; this guards
    # an environment that lacks it anyway.
    try:
        import psutil  # noqa: F401
    except ImportError:
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        filesystem_async._process_memory = lambda: 0


# --- Transformer Engine's layer spec on the CPU ---------------------------------------------
# Megatron's own get_gpt_layer_with_transformer_engine_spec, built with stand-ins for the TE
# modules it names (TE's kernels are CUDA-only): the same module tree, parameter names and
# state-dict entries, so that the `te` spec's mapping, conversion, checkpoint and export code runs
# on the CPU. What stays CUDA-only: TE's fused kernels, FP8 and its metadata (the stand-ins'
# `_extra_state` is empty, as TE's is without FP8).


def te_layer_spec(qk_layernorm: bool) -> Any:
    """Megatron's TE GPT layer spec with the CPU stand-ins in place of TESpecProvider's modules."""
    from megatron.core.models.gpt import gpt_layer_specs

    missing = object()
    real = getattr(gpt_layer_specs, "TESpecProvider", missing)
    gpt_layer_specs.TESpecProvider = _TEStandInProvider  # type: ignore[attr-defined]
    try:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    finally:
        if real is missing:
            del gpt_layer_specs.TESpecProvider
        else:
            gpt_layer_specs.TESpecProvider = real  # type: ignore[attr-defined]


class _TEStandInProvider:
    """The part of megatron's BackendSpecProvider that a dense GPT layer spec asks for."""

    def column_parallel_layer_norm_linear(self) -> type:
        return _stand_ins()[0]

    def fuse_layernorm_and_linear(self) -> bool:
        return True

    def row_parallel_linear(self) -> type:
        from megatron.core.tensor_parallel import RowParallelLinear

        return RowParallelLinear  # TERowParallelLinear's names: weight, _extra_state

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        return WrappedTorchNorm  # TENorm's names: weight

    def core_attention(self) -> type:
        return _stand_ins()[1]


@functools.cache
def _stand_ins() -> tuple[type, type]:
    """(TELayerNormColumnParallelLinear's, TEDotProductAttention's stand-in): classes over
    megatron's local modules, defined on first use so that importing this module stays cheap."""
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class LayerNormColumnParallelLinear(ColumnParallelLinear):
        """RMSNorm(x) * layer_norm_weight, then the column-parallel linear (its input
        all-gathered over TP under sequence parallelism after the norm, as TE does).
        `layer_norm_weight` is tagged `sequence_parallel` as TE tags it, so that its gradient
        is summed over the TP group."""

        def __init__(
            self,
            input_size: int,
            output_size: int,
            *,
            config: Any,
            init_method: Callable[..., Any],
            gather_output: bool,
            bias: bool,
            skip_bias_add: bool,
            is_expert: bool,
            skip_weight_param_allocation: bool = False,
            tp_comm_buffer_name: str | None = None,
            tp_group: Any = None,
            stride: int = 1,
        ):
            if config.normalization != "RMSNorm":
                raise ValueError(f"normalization={config.normalization!r}: the stand-in is RMSNorm")
            super().__init__(
                input_size,
                output_size,
                config=config,
                init_method=init_method,
                gather_output=gather_output,
                bias=bias,
                skip_bias_add=skip_bias_add,
                is_expert=is_expert,
                skip_weight_param_allocation=skip_weight_param_allocation,
                tp_comm_buffer_name=tp_comm_buffer_name,
                tp_group=tp_group,
                stride=stride,
            )
            self.eps = config.layernorm_epsilon
            self.layer_norm_weight = torch.nn.Parameter(
                torch.ones(input_size, dtype=config.params_dtype)
            )
            self.layer_norm_weight.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]

        def forward(self, input_: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            weight = self.layer_norm_weight
            normed = torch.nn.functional.rms_norm(input_, (input_.shape[-1],), weight, self.eps)
            return super().forward(normed, *args, **kwargs)

    class DotProductAttentionWithExtraState(DotProductAttention):
        """Megatron's unfused attention with TEDotProductAttention's (empty) `_extra_state`;
        a state dict without it (a local-spec checkpoint) loads, as megatron's linears allow."""

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._register_load_state_dict_pre_hook(
                lambda state_dict, prefix, *a, **k: state_dict.setdefault(f"{prefix}_extra_state")
            )

        def get_extra_state(self) -> None:
            return None

        def set_extra_state(self, state: Any) -> None:
            """Nothing to restore: there is no FP8 metadata on the CPU."""

    return LayerNormColumnParallelLinear, DotProductAttentionWithExtraState
