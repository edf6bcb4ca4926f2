"""A tiny Megatron GPTModel trained with DDP + Megatron's optimizer, for runtime tests
(4 layers, hidden 64, 4 heads / 2 query groups, SwiGLU, RMSNorm, RoPE, vocab 256, fp32)."""

import torch


def train_tiny_gpt(tp: int, pp: int, steps: int, seed: int = 7) -> dict:
    """Train `steps` steps on a fixed global batch split over the data-parallel ranks;
    return the per-step global mean loss and a digest of this rank's parameters."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import TransformerConfig

    from megatron_rpg.config import ParallelConfig
    from megatron_rpg.parallel import initialize_model_parallel

    layout = initialize_model_parallel(
        ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp), seed=seed
    )
    config = TransformerConfig(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        normalization="RMSNorm",
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        batch_p2p_comm=False,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=256,
        max_sequence_length=32,
        position_embedding_type="rope",
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model
    )
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0, bf16=False, fp16=False),
        [ddp],
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = opt.scale_loss

    seq, micro, global_batch = 32, 2, 8
    num_micro = global_batch // (micro * layout.data_parallel)
    tokens = torch.randint(
        0, 256, (global_batch, seq + 1), generator=torch.Generator().manual_seed(0)
    )
    mine = tokens.chunk(layout.data_parallel)[layout.dp_rank]
    batches = [mine[i * micro : (i + 1) * micro] for i in range(num_micro)]
    mask = torch.tril(torch.ones(seq, seq, dtype=torch.bool)).logical_not()[None, None]
    positions = torch.arange(seq)[None].expand(micro, seq)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        out = model(batch[:, :-1], positions, mask, labels=batch[:, 1:])

        def loss_func(per_token):
            loss = per_token.float().mean()
            # clone: the schedule divides the returned loss in place by num_microbatches
            return loss, {"loss": loss.detach().clone()}

        return out, loss_func

    losses = []
    for _ in range(steps):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        out = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=ddp,
            num_microbatches=num_micro,
            seq_length=seq,
            micro_batch_size=micro,
            forward_only=False,
        )
        opt.step()
        counted = out and layout.tp_rank == 0  # last stage holds losses, once per TP group
        local = torch.tensor(
            [sum(o["loss"].item() for o in out) / num_micro if counted else 0.0],
            dtype=torch.float64,
        )
        dist.all_reduce(local)
        losses.append(local.item() / layout.data_parallel)
    digest = sum(float(p.detach().double().square().sum()) for p in model.parameters())
    return {"losses": losses, "digest": digest, "layout": layout}
