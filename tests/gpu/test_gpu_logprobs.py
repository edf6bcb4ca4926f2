"""GPU checks (run on a machine with CUDA: `pytest tests/gpu`). Skipped on the CPU."""

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU; CPU correctness is in tests/"
)


def test_fused_bf16_matches_fp32_reference_on_qwen_vocabulary():
    from megatron_rpg.logprobs import fused_logprobs

    torch.manual_seed(0)
    tokens, hidden, vocab = 2048, 1024, 151936
    h = (torch.randn(tokens, hidden, device="cuda") * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(vocab, hidden, device="cuda") * 0.02).bfloat16().requires_grad_()
    targets = torch.randint(vocab, (tokens,), device="cuda")
    lp, ent = fused_logprobs(h, w, targets)
    (lp.sum() + ent.sum()).backward()

    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    logp = torch.log_softmax(h32 @ w32.t(), -1)
    ref_lp = logp.gather(-1, targets[:, None]).squeeze(-1)
    ref_ent = -(logp.exp() * logp).sum(-1)
    (ref_lp.sum() + ref_ent.sum()).backward()
    # bf16 logits: relative rounding 2^-8 of |logit| (< ~2 here)
    torch.testing.assert_close(lp, ref_lp, atol=2e-2, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=2e-2, rtol=0)
    for got, want in ((h.grad, h32.grad), (w.grad, w32.grad)):
        scale = want.abs().max()
        torch.testing.assert_close(got.float(), want, atol=2e-2 * scale.item(), rtol=0)


@pytest.mark.parametrize("layer_spec", ["local", "te"])
def test_one_training_step_of_a_tiny_policy_on_gpu(nccl_world, check, layer_spec):
    """The real GPU path: NCCL world of one, bf16, the shim not applied, DDP + optimizer, under
    Megatron's local spec and Transformer Engine's."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_rpg.config import ParallelConfig
    from megatron_rpg.forward_backward import LogprobOptions, forward_backward
    from megatron_rpg.models import ModelArch, build_model_chunks
    from megatron_rpg.models.builder import _have_transformer_engine
    from megatron_rpg.parallel import cpu_shim, destroy_model_parallel, initialize_model_parallel

    if layer_spec == "te" and not _have_transformer_engine():
        pytest.skip("Transformer Engine is not installed")
    assert cpu_shim.apply() is False
    initialize_model_parallel(ParallelConfig(), seed=0)
    try:
        hf = dict(
            model_type="qwen3",
            vocab_size=1000,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            rms_norm_eps=1e-6,
            max_position_embeddings=128,
        )
        arch = ModelArch.from_hf(hf)
        chunks = build_model_chunks(arch, ParallelConfig(), torch.bfloat16, layer_spec=layer_spec)
        chunks = [c.cuda() for c in chunks]
        config = chunks[0].config
        ddp = [DistributedDataParallel(config, DistributedDataParallelConfig(), c) for c in chunks]
        config.finalize_model_grads_func = finalize_model_grads
        opt = get_megatron_optimizer(OptimizerConfig(lr=1e-3, bf16=True), ddp)
        tokens = torch.randint(1000, (2, 64), device="cuda")
        options = LogprobOptions(vocab_size=1000)
        losses = []

        def nll_loss(lp, ent, batch):
            return -lp.mean(), {"nll": -lp.mean().detach()}

        for _ in range(3):
            for m in ddp:
                m.zero_grad_buffer()
            opt.zero_grad()
            out = forward_backward(ddp, [{"tokens": tokens}], options, nll_loss)
            opt.step()
            losses.append(out[0]["nll"].item())
        check(losses[-1] / losses[0], "< 1 (the loss falls)")
        assert losses[-1] < losses[0]
    finally:
        destroy_model_parallel()
