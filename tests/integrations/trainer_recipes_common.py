"""A tiny random Llama, a token-id data set and TrainingArguments shared by the Trainer recipe tests and
their 2-process worker (no download: ``LlamaForCausalLM.from_config``)."""

from __future__ import annotations

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        return LlamaForCausalLM(config)


def tiny_lora(seed: int = 0):
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)
        return get_peft_model(tiny_llama(seed), config)


class TokenRows(torch.utils.data.Dataset):
    """Rows of token ids of one length; labels = input_ids. ``shared < 1``: each token is random with
    probability 1 - shared, else that of one sequence all rows share (a strong mean gradient)."""

    def __init__(self, n: int = 16, length: int = 12, seed: int = 0, shared: float = 0.0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 100, (n, length), generator=g)
        common = torch.randint(0, 100, (length,), generator=g).expand(n, length)
        keep = torch.rand(n, length, generator=g) < shared
        self.ids = torch.where(keep, common, self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def training_args(out, **overrides):
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(out),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        max_grad_norm=0.0,
    )
    return TrainingArguments(**{**base, **overrides})


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}


def cpu_fsdp_trainer(trainer_cls):
    """``trainer_cls`` made to honour ``fsdp=`` on CPU (gloo). accelerate (1.x) keeps the FSDP plugin
    only when the processes run on accelerators (``AcceleratorState`` switches MULTI_GPU/XPU/NPU/...
    runs to ``DistributedType.FSDP``, not MULTI_CPU ones), so with ``use_cpu=True`` the Trainer silently
    falls back to DDP. This subclass shows accelerate a MULTI_GPU state while the Trainer builds its
    Accelerator, so that state becomes FSDP and accelerate's own FSDP2 path (``fully_shard`` on a CPU
    mesh, the optimiser's parameters swapped for the sharded ones) runs as it would on GPUs. Tests only."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    class CpuFSDP(trainer_cls):
        def create_accelerator_and_postprocess(self):
            shared = PartialState._shared_state
            before = shared.get("distributed_type")
            if before == DistributedType.MULTI_CPU and self.args.fsdp:
                shared["distributed_type"] = DistributedType.MULTI_GPU
            try:
                super().create_accelerator_and_postprocess()
            finally:
                shared["distributed_type"] = before

    CpuFSDP.__name__ = CpuFSDP.__qualname__ = f"CpuFSDP{trainer_cls.__name__}"
    return CpuFSDP
