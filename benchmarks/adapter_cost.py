"""What one LoRA teacher costs in host memory beyond its tensor bytes: as a PEFT adapter injected into the
transformer, and as a teacher of the trainer's `TeacherBank` (flat tensors behind one shared slot adapter).

`benchmarks.teacher_scale` found the process's peak resident set ~30 MiB higher with 200 toy teachers than with 3
when every teacher was a PEFT adapter, against 1.56 MiB of LoRA weights. This isolates the per-teacher cost: the test
suite's tiny SD3 (the benchmark's `tiny` preset), `count` rank-4 LoRAs on the attention projections, added with PEFT's
`inject_adapter_in_model` (what `load_lora_adapter` does) or `TeacherBank.add`, each way in a process of its own; per
teacher: the resident-set growth, the Python heap growth (`tracemalloc`: module, parameter, tensor and dict objects),
the tensor bytes, and the number of `nn.Module` objects it adds.

    python -m benchmarks.adapter_cost [--count 200]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tracemalloc

import torch

from .common import markdown_table, setup, write_results


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


RESULT_TAG = "[adapter_cost:result]"
WAYS = {"peft": "PEFT adapter", "bank": "TeacherBank teacher"}


def measure(count: int, way: str = "peft") -> dict:
    """Add `count` LoRAs to the tiny SD3 transformer, as PEFT adapters (`way="peft"`) or bank teachers (`"bank"`);
    per-teacher costs."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from trl_diffusion_opd.teacher_bank import TeacherBank
    from trl_diffusion_opd.testing import get_tiny_sd3_pipeline

    transformer = get_tiny_sd3_pipeline(seed=0, with_t5=False).transformer
    targets = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
    config = LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights="gaussian")
    inject_adapter_in_model(config, transformer, adapter_name="a000")  # the first adapter wraps the layers
    bank = TeacherBank()
    shapes = {k: v.shape for k, v in get_peft_model_state_dict(transformer, adapter_name="a000").items()}
    if way == "bank":  # the first teacher makes the slot adapter

        def add(name):
            bank.add(transformer, name, {k: torch.randn(shape) for k, shape in shapes.items()}, config, name)

        add("t000")
    else:

        def add(name):
            inject_adapter_in_model(config, transformer, adapter_name=name)

    gc.collect()
    modules, params = (
        len(list(transformer.modules())),
        sum(p.numel() * p.element_size() for p in transformer.parameters()),
    )
    rss = _rss()
    tracemalloc.start()
    for index in range(1, count + 1):
        add(f"t{index:03d}")
    gc.collect()
    heap, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_growth = _rss() - rss
    tensor_bytes = sum(p.numel() * p.element_size() for p in transformer.parameters()) - params
    if way == "bank":
        tensor_bytes = sum(bank.teacher_bytes(name) for name in bank.names[1:])
    return {
        "way": way,
        "adapters": count,
        "tensor_bytes_per_adapter": tensor_bytes / count,
        "python_heap_per_adapter": heap / count,
        "rss_per_adapter": rss_growth / count,
        "modules_per_adapter": (len(list(transformer.modules())) - modules) / count,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--way", choices=list(WAYS), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setup()
    torch.manual_seed(0)
    if args.way:  # one way, in this process
        result = measure(args.count, args.way)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return result
    results = []
    for way in WAYS:
        command = [sys.executable, "-m", "benchmarks.adapter_cost", "--way", way, "--count", str(args.count)]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results += [json.loads(line[len(RESULT_TAG) :]) for line in out.splitlines() if line.startswith(RESULT_TAG)]
    kib = 1024
    table = markdown_table(
        [
            "teachers added",
            "as",
            "modules / teacher",
            "tensor bytes / teacher (KiB)",
            "Python heap / teacher (KiB)",
            "resident set / teacher (KiB)",
        ],
        [
            [
                r["adapters"],
                WAYS[r["way"]],
                f"{r['modules_per_adapter']:.0f}",
                f"{r['tensor_bytes_per_adapter'] / kib:.1f}",
                f"{r['python_heap_per_adapter'] / kib:.1f}",
                f"{r['rss_per_adapter'] / kib:.1f}",
            ]
            for r in results
        ],
    )
    if not args.no_write:
        write_results(
            "adapter_cost",
            "What one LoRA teacher costs in host memory (benchmarks.adapter_cost)",
            {"count": args.count},
            {"results": results},
            table + "\n",
        )
    print(table)
    return {"results": results}


if __name__ == "__main__":
    main()
