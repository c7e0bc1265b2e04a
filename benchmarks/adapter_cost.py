"""What one LoRA adapter costs in host memory beyond its tensor bytes, once PEFT has injected it into a transformer.

`benchmarks.teacher_scale` finds the process's peak resident set ~30 MiB higher with 200 toy teachers than with 3,
against 1.56 MiB of LoRA weights. This isolates the per-adapter cost: the test suite's tiny SD3 (the benchmark's
`tiny` preset), `count` rank-4 adapters on the attention projections added with PEFT's `inject_adapter_in_model` (what
`load_lora_adapter` does), and per adapter: the resident-set growth, the Python heap growth (`tracemalloc`, i.e. the
module, parameter and dict objects), the tensor bytes, and the number of `nn.Module` objects it adds.

    python -m benchmarks.adapter_cost [--count 200]
"""

from __future__ import annotations

import argparse
import gc
import os
import tracemalloc

import torch

from .common import markdown_table, setup, write_results


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(count: int) -> dict:
    """Add `count` adapters to the tiny SD3 transformer; per-adapter costs."""
    from peft import LoraConfig, inject_adapter_in_model

    from trl_diffusion_opd.testing import get_tiny_sd3_pipeline

    transformer = get_tiny_sd3_pipeline(seed=0, with_t5=False).transformer
    targets = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
    config = LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights="gaussian")
    inject_adapter_in_model(config, transformer, adapter_name="a000")  # the first adapter wraps the layers
    gc.collect()
    modules, params = (
        len(list(transformer.modules())),
        sum(p.numel() * p.element_size() for p in transformer.parameters()),
    )
    rss = _rss()
    tracemalloc.start()
    for index in range(1, count + 1):
        inject_adapter_in_model(config, transformer, adapter_name=f"a{index:03d}")
    gc.collect()
    heap, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_growth = _rss() - rss
    tensor_bytes = sum(p.numel() * p.element_size() for p in transformer.parameters()) - params
    return {
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
    args = parser.parse_args(argv)
    setup()
    torch.manual_seed(0)
    result = measure(args.count)
    kib = 1024
    table = markdown_table(
        [
            "adapters added",
            "modules / adapter",
            "tensor bytes / adapter (KiB)",
            "Python heap / adapter (KiB)",
            "resident set / adapter (KiB)",
        ],
        [
            [
                result["adapters"],
                f"{result['modules_per_adapter']:.0f}",
                f"{result['tensor_bytes_per_adapter'] / kib:.1f}",
                f"{result['python_heap_per_adapter'] / kib:.1f}",
                f"{result['rss_per_adapter'] / kib:.1f}",
            ]
        ],
    )
    if not args.no_write:
        write_results(
            "adapter_cost",
            "What one PEFT LoRA adapter costs (benchmarks.adapter_cost)",
            vars(args),
            result,
            table + "\n",
        )
    print(table)
    return result


if __name__ == "__main__":
    main()
