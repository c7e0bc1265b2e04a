"""One training job of `tests/test_sharded.py`, run alone (`python`) or under `torchrun --nproc_per_node 2`.

`python _sharded_job.py MODE OUT TEACHER_A TEACHER_B [CONFIG_JSON]` with MODE `single`, `ddp` or `fsdp2`: trains 3 rounds (checkpoint
at round 2), then resumes a second trainer from checkpoint-2 to round 3, and writes `OUT/result-rank<r>.json` (losses,
the student before and after, resumed student) and the exported adapter `OUT/final`.

Both ranks draw the same prompts and noise (`MirroredTrainer`), so a correct data-parallel or sharded update equals the
single-process one: the averaged gradient of two equal gradients is that gradient. `tests/test_opd_trainer.py` covers
ranks drawing different prompts.

accelerate turns FSDP on only for accelerator backends (`AcceleratorState` ignores `ACCELERATE_USE_FSDP` when the
distributed type is MULTI_CPU), so `fsdp2` sets accelerate's FSDP2 plugin, built from the shipped `fsdp2` preset, on
the state itself; everything after that (`fully_shard` of the blocks, optimizer, clipping, state dicts) is
accelerate's and torch's own code, on gloo.
"""

import json
import os
import sys
from pathlib import Path

import torch
import yaml
from peft import LoraConfig
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer
from trl_diffusion_opd.data import RoundRobinPrompts
from trl_diffusion_opd.scripts.launch import accelerate_presets
from trl_diffusion_opd.testing import get_tiny_sd3_pipeline


class _Mirror(Dataset):
    """Item i of `rounds` for every rank: items i * W .. i * W + W - 1 are all round i."""

    def __init__(self, rounds, world):
        self.rounds, self.world = rounds, world

    def __len__(self):
        return len(self.rounds) * self.world

    def __getitem__(self, index):
        return self.rounds[index // self.world]


class MirroredTrainer(DiffusionOPDTrainer):
    def get_train_dataloader(self):
        world = self.accelerator.num_processes
        rounds = _Mirror(RoundRobinPrompts(self.task_prompts, self.args.per_device_train_batch_size, 1, 0), world)
        loader = DataLoader(rounds, batch_size=1, sampler=SequentialSampler(rounds), collate_fn=lambda items: items[0])
        return self.accelerator.prepare(loader)

    def _generator(self, *keys):
        if len(keys) == 3 and keys[1] == self.accelerator.process_index:  # (step, rank, task): every rank as rank 0
            keys = (keys[0], 0, keys[2])
        return super()._generator(*keys)


def force_fsdp2(trainer):
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    config = yaml.safe_load(Path(accelerate_presets()["fsdp2"]).read_text())["fsdp_config"]
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=config["fsdp_version"],
        auto_wrap_policy=config["fsdp_auto_wrap_policy"].lower(),
        reshard_after_forward=config["fsdp_reshard_after_forward"],
        state_dict_type=config["fsdp_state_dict_type"],
        cpu_ram_efficient_loading=config["fsdp_cpu_ram_efficient_loading"],
        activation_checkpointing=config["fsdp_activation_checkpointing"],
    )
    state = trainer.accelerator.state
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def build(mode, out, teachers, max_steps, **kwargs):
    args = DiffusionOPDConfig(
        output_dir=out,
        max_steps=max_steps,
        resolution=32,
        num_inference_steps=3,
        per_device_train_batch_size=2,
        max_sequence_length=1,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        ema=False,
        report_to="none",
        disable_tqdm=True,
        learning_rate=1e-2,
        **kwargs,
    )
    prompts = {"a": [f"prompt a {i}" for i in range(4)], "b": [f"prompt b {i}" for i in range(4)]}
    lora = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["attn.to_q", "attn.to_v"])
    trainer = MirroredTrainer(
        get_tiny_sd3_pipeline(with_t5=False), teachers, args=args, train_dataset=prompts, peft_config=lora
    )
    if mode == "fsdp2":
        force_fsdp2(trainer)
    return trainer


def switch_costs(trainer):
    """FSDP2 unshards (all-gathers) counted while switching adapters and during one teacher / student forward."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    calls = []
    original = FSDPParamGroup.unshard
    FSDPParamGroup.unshard = lambda group, *a, **k: calls.append(1) or original(group, *a, **k)
    try:
        counts = {}
        trainer.adapters.activate("a")
        trainer.adapters.activate("student")
        counts["switch"] = len(calls)
        cond = trainer.prompt_cache(["prompt a 0"])
        x = torch.zeros(1, *trainer.family.init_latents(1, 32, torch.Generator()).shape[1:])
        sigma = torch.ones(1)
        model = trainer.accelerator.unwrap_model(trainer.model)
        with torch.no_grad():
            for name in ("a", "student"):
                before = len(calls)
                with trainer.adapters.use(name):
                    trainer.family.velocity(model, x, sigma, cond, 1.0, None)
                counts[f"forward_{name}"] = len(calls) - before
    finally:
        FSDPParamGroup.unshard = original
    return counts


def student(trainer):
    return {k: v.tolist() for k, v in trainer.student_state_dict().items()}  # gathered to full tensors on every rank


def main():
    mode, out, teacher_a, teacher_b = sys.argv[1:5]
    extra = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}  # more config fields (e.g. teacher_offload)
    teachers = {"a": teacher_a, "b": teacher_b}
    torch.manual_seed(0)
    trainer = build(mode, out, teachers, 3, **extra)
    initial = student(trainer)
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    final = student(trainer)
    trainer.save_model(os.path.join(out, "final"))
    sharded = sorted({type(p).__name__ for p in trainer.student_parameters})

    switch = switch_costs(trainer) if mode == "fsdp2" else None

    full_teachers = {
        task: sorted({type(p).__name__ for p in m.parameters()}) for task, m in trainer.full_teachers.items()
    }
    resumed_trainer = build(mode, out, teachers, 3, **extra)
    resumed_trainer.train(resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
    resumed = student(resumed_trainer)
    rank = trainer.accelerator.process_index
    result = {
        "world": trainer.accelerator.num_processes,
        "losses": losses,
        "initial": initial,
        "final": final,
        "resumed": resumed,
        "parameter_types": sharded,
        "switch": switch,
        "full_teachers": full_teachers,
    }
    Path(out, f"result-rank{rank}.json").write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        trainer.accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
