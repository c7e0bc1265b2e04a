"""Prompt sources per task and the round-robin schedule that feeds the trainer.

A prompt row is a dict with a `"prompt"` string and any metadata (kept for rewards, e.g. GenEval's `include`
lists). Sources per task:

- a `datasets.Dataset` (or `IterableDataset` materialised) with a `"prompt"` column;
- a list of strings or of row dicts;
- a local `.txt` file, one prompt per line (Flow-GRPO's `dataset/ocr/train.txt`);
- a local `.jsonl` file with a `"prompt"` field per line (GenEval's `*_metadata.jsonl`);
- a local dataset folder or a Hub dataset id, loaded with `datasets.load_dataset` (`id:split` picks the split).

A single dataset with `"prompt"` and `"task"` columns is split by task.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
from torch.utils.data import Dataset as TorchDataset


PromptRow = dict[str, Any]


def load_prompt_source(source: Any, name: str = "prompts") -> list[PromptRow]:
    """Load one task's prompts from any supported source (see the module docstring).

    Raises:
        ValueError: unreadable source, missing `"prompt"` field, or no prompts.
    """
    if isinstance(source, str):
        rows = _load_path(source, name)
    elif isinstance(source, datasets.Dataset):
        if "prompt" not in source.column_names:
            raise ValueError(f"{name}: the dataset has no 'prompt' column (columns: {source.column_names}).")
        rows = [dict(row) for row in source]
    elif isinstance(source, Sequence):
        rows = [{"prompt": item} if isinstance(item, str) else dict(item) for item in source]
    else:
        raise ValueError(f"{name}: unsupported prompt source of type {type(source).__name__}.")
    for index, row in enumerate(rows):
        if not isinstance(row.get("prompt"), str):
            raise ValueError(f"{name}: row {index} has no string 'prompt' field: {row!r}")
    if not rows:
        raise ValueError(f"{name}: no prompts.")
    return rows


def _load_path(source: str, name: str) -> list[PromptRow]:
    if source.endswith(".txt") and os.path.isfile(source):
        with open(source, encoding="utf-8") as handle:
            return [{"prompt": line.strip()} for line in handle if line.strip()]
    if source.endswith(".jsonl") and os.path.isfile(source):
        rows = []
        with open(source, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{name}: {source} line {number} is not valid JSON: {error}") from error
        return rows
    path, _, split = source.partition(":") if not os.path.exists(source) else (source, "", "")
    try:
        loaded = datasets.load_dataset(path, split=split or "train")
    except Exception as error:  # datasets raises many types; the message is what users need
        raise ValueError(f"{name}: could not load prompts from '{source}': {error}") from error
    return load_prompt_source(loaded, name)


def prompts_by_task(train_dataset: Any) -> dict[str, list[PromptRow]]:
    """Normalise a training dataset into `{task: [rows]}`, keeping the tasks' first-seen order.

    Accepts a dataset with `"prompt"` and `"task"` columns (or a list of such rows), or a mapping
    `{task: source}` with any source `load_prompt_source` reads.
    """
    if isinstance(train_dataset, Mapping):
        return {str(task): load_prompt_source(src, f"task '{task}'") for task, src in train_dataset.items()}
    rows = load_prompt_source(train_dataset, "train_dataset")
    grouped: dict[str, list[PromptRow]] = {}
    for index, row in enumerate(rows):
        if "task" not in row:
            raise ValueError(
                f"train_dataset row {index} has no 'task' field: give a 'task' column or a dict {{task: dataset}}."
            )
        grouped.setdefault(str(row["task"]), []).append(row)
    return grouped


class RoundRobinPrompts(TorchDataset):
    """Item i is one round for one device: `{task: [prompts_per_task rows]}` for every task, in a fixed order.

    Each task's prompts are cycled through in a fresh seeded permutation per pass, so a task with few prompts
    repeats them while a larger one is still on its first pass. Items are a pure function of the index, which
    makes resuming exact (the Trainer skips the rounds already done) and gives each rank disjoint prompts (the
    distributed sampler hands rank r the items r, r + W, ...).

    Args:
        prompts: `{task: rows}`.
        prompts_per_task: Prompts per task in one item.
        num_processes: World size W; the length is a multiple of it.
        seed: Seed of the permutations.
    """

    def __init__(self, prompts: dict[str, list[PromptRow]], prompts_per_task: int, num_processes: int, seed: int):
        self.prompts = prompts
        self.tasks = list(prompts)
        self.k = prompts_per_task
        self.seed = seed
        per_round = prompts_per_task * num_processes
        rounds = max(-(-len(rows) // per_round) for rows in prompts.values())
        self.length = rounds * num_processes
        self._perms: dict[tuple[str, int], list[int]] = {}

    def __len__(self) -> int:
        return self.length

    def _permutation(self, task: str, epoch: int) -> list[int]:
        key = (task, epoch)
        if key not in self._perms:
            order = list(range(len(self.prompts[task])))
            random.Random(f"{self.seed}-{task}-{epoch}").shuffle(order)
            self._perms[key] = order
        return self._perms[key]

    def __getitem__(self, index: int) -> dict[str, list[PromptRow]]:
        item = {}
        for task in self.tasks:
            rows = self.prompts[task]
            chosen = []
            for position in range(index * self.k, (index + 1) * self.k):
                epoch, offset = divmod(position, len(rows))
                chosen.append(rows[self._permutation(task, epoch)[offset]])
            item[task] = chosen
        return item
