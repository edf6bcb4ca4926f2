"""Rank functions for tests/test_gpu_branches.py: the GPU recipes' branches on gloo ranks."""

import contextlib
import time
from unittest import mock

import torch

from hf_cases import TOKENS, hf_model, load_in_layout


def state_dict_keys(name, layer_spec):
    """The state-dict keys (parameters and `_extra_state`) of a model built under layer_spec."""
    from megatron_rpg.config import ParallelConfig
    from megatron_rpg.models import ModelArch, build_model_chunks
    from megatron_rpg.parallel import initialize_model_parallel

    from hf_cases import FAMILIES

    initialize_model_parallel(ParallelConfig(), seed=0)
    (chunk,) = build_model_chunks(
        ModelArch.from_hf(FAMILIES[name]), ParallelConfig(), torch.float32, layer_spec=layer_spec
    )
    if torch.cuda.is_available():
        chunk = chunk.cuda()
    return sorted(chunk.state_dict())


def save_in_spec(name, tp, pp, layer_spec, out):
    """The seed-0 HF weights in this layout and spec, saved as a Megatron checkpoint."""
    from megatron_rpg.checkpoint.mcore import save_mcore

    from hf_cases import FAMILIES

    _, chunks = load_in_layout(name, hf_model(name).state_dict(), tp, pp, layer_spec=layer_spec)
    save_mcore(chunks, out, FAMILIES[name])


def logits_in_spec(checkpoint, tp, pp, layer_spec):
    """A Megatron checkpoint loaded at TP x PP under layer_spec: full logits on the last stage."""
    from megatron_rpg.checkpoint.mcore import checkpoint_hf_config, load_mcore
    from megatron_rpg.config import ParallelConfig
    from megatron_rpg.forward_backward import full_logits
    from megatron_rpg.models import ModelArch, build_model_chunks
    from megatron_rpg.parallel import initialize_model_parallel

    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
    arch = ModelArch.from_hf(checkpoint_hf_config(checkpoint))
    initialize_model_parallel(parallel, seed=0)
    chunks = build_model_chunks(
        arch, parallel, torch.float32, initialize=False, layer_spec=layer_spec
    )
    load_mcore(chunks, checkpoint)
    return full_logits(chunks, TOKENS, arch.vocab_size)


class RecordingGroup:
    """vLLM's PyNcclCommunicator as the trainer's packed broadcast uses it: broadcast(tensor,
    src). Keeps a copy of every packed tensor sent."""

    def __init__(self):
        self.sent = []

    def broadcast(self, tensor, src):
        self.sent.append(tensor.clone())


class _Stream:
    def synchronize(self):
        pass


def vllm_packed_broadcast(name, hf_state, tp, bucket_bytes, packed_bytes, layer_spec):
    """vLLM's NCCL trainer engine, packed, sending our export stream into a recording group;
    rank 0 unpacks what was sent with vLLM's own unpack_tensor, by the announced metadata. CUDA
    streams are stood in for (the packing is host code); nothing else of vLLM's is changed."""
    from vllm.distributed.weight_transfer import nccl_engine, packed_tensor

    from megatron_rpg.models.export import iter_hf_weights
    from megatron_rpg.rollout.vllm_transfer import BucketSource

    arch, chunks = load_in_layout(name, hf_state, tp, 1, layer_spec=layer_spec)
    source = BucketSource(iter_hf_weights(chunks, arch, bucket_bytes))
    meta = source.metadata()
    engine = object.__new__(nccl_engine.NCCLTrainerWeightTransferEngine)
    engine.is_sender = torch.distributed.get_rank() == 0
    engine.model_update_group = group = RecordingGroup()
    engine.packed, engine.packed_buffer_size_bytes, engine.packed_num_buffers = (
        True,
        packed_bytes,
        2,
    )
    with (
        mock.patch.object(packed_tensor, "_get_streams", lambda device, n: [_Stream()] * n),
        mock.patch("torch.cuda.stream", lambda stream: contextlib.nullcontext()),
        mock.patch("torch.accelerator.current_device_index", lambda: 0),
    ):
        engine._broadcast(source, meta)
    if not engine.is_sender:
        return None
    received, position = {}, 0
    for packed in group.sent:
        names, shapes, dtypes, sizes, used = [], [], [], [], 0
        while used < packed.numel():
            m = meta[position]
            size = torch.Size(m.shape).numel() * m.dtype.itemsize
            names.append(m.name), shapes.append(list(m.shape)), dtypes.append(m.dtype)
            sizes.append(size)
            used, position = used + size, position + 1
        for hf_name, tensor in packed_tensor.unpack_tensor(packed, names, shapes, dtypes, sizes):
            received[hf_name] = tensor.clone()
    return {"received": received, "packs": len(group.sent), "buckets": len(source.bucket_metadata)}


def engine_outlasting_the_timeout(seconds):
    """Rank 0's engine generates for `seconds`, longer than the process group's timeout; every
    rank gets its responses through the RolloutService, then grades through on_rank0 as long."""
    from megatron_rpg.rewards.grader import TaskGrader
    from megatron_rpg.rollout.collective import on_rank0
    from megatron_rpg.rollout.protocol import Response
    from megatron_rpg.rollout.service import RolloutService

    class SlowEngine:
        collective = False

        def generate(self, prompts, params):
            time.sleep(seconds)
            return [[Response(token_ids=[7, 8], logprobs=[-0.5, -0.25], finish_reason="stop")]]

    rank = torch.distributed.get_rank()
    service = RolloutService(SlowEngine() if rank == 0 else None, TaskGrader("exact"), rank)
    groups = service.generate([[1, 2, 3]], None)

    def grade():
        time.sleep(seconds)
        return [1.0]

    return groups[0][0].token_ids, on_rank0(grade)
