"""Prompt sources per task and the round-robin schedule that feeds the trainer.

A prompt row is a dict with a `"prompt"` string and any metadata (kept for rewards, e.g. GenEval's `include`
lists). Sources per task:

- a `datasets.Dataset` (or `IterableDataset` materialised) with a `"prompt"` column;
- a list of strings or of row dicts;
- a local `.txt` file, one prompt per line (Flow-GRPO's `dataset/ocr/train.txt`);
- a local `.jsonl` file with a `"prompt"` field per line (GenEval's `*_metadata.jsonl`); every other field is kept;
- a local `.csv`, `.json` or `.parquet` file with a `"prompt"` column;
- a local dataset folder (data files, or a `Dataset.save_to_disk` folder) or a Hub dataset id, loaded with
  `datasets` (`id:split` picks the split);
- a registered name `scheme:rest` (`trl_diffusion_opd.registry`), e.g. `world:<task>` / `world:<task>:heldout`,
  the tiny world's training / held-out scenes.

A single dataset with `"prompt"` and `"task"` columns is split by task.

A row may carry input images for editing models in an `"image"` field, as the pipelines' `image=` argument takes
them: one image or a list (several references), each a PIL image, a local path (relative to the data file's folder,
else to the working directory) or a `datasets.Image` value. Every path is checked when the source loads, before any
model does; `row_images` loads a row's images when they are used.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import PIL.Image
from torch.utils.data import Dataset as TorchDataset

from .registry import load_named_prompts


PromptRow = dict[str, Any]
# The row field holding a row's input image(s).
IMAGE_FIELD = "image"


def load_prompt_source(source: Any, name: str = "prompts", base_dir: str | None = None) -> list[PromptRow]:
    """Load one task's prompts from any supported source (see the module docstring).

    Args:
        source: The source.
        name: What to call it in error messages.
        base_dir: Folder that relative image paths are resolved against (default: the data file's folder for a
            file source, else the working directory).

    Raises:
        ValueError: unreadable source, missing `"prompt"` field, no prompts, or a row's input image that is missing
            or unreadable.
    """
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    try:
        named = load_named_prompts(source) if isinstance(source, str) else None
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from error
    if named is not None:
        rows = named
    elif isinstance(source, str):
        rows = _load_path(source, name)
        if base_dir is None and os.path.exists(source):
            base_dir = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    elif isinstance(source, datasets.DatasetDict):
        if "train" not in source:
            raise ValueError(f"{name}: the dataset has no 'train' split (splits: {list(source)}); pick one.")
        rows = load_prompt_source(source["train"], name)
    elif isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        columns = source.column_names
        if columns is not None and "prompt" not in columns:
            raise ValueError(f"{name}: the dataset has no 'prompt' column (columns: {columns}).")
        rows = [dict(row) for row in source]
    elif isinstance(source, Sequence):
        rows = []
        for index, item in enumerate(source):
            if not isinstance(item, (str, Mapping)):
                raise ValueError(f"{name}: item {index} is neither a prompt string nor a row dict: {item!r}")
            rows.append({"prompt": item} if isinstance(item, str) else dict(item))
    else:
        raise ValueError(f"{name}: unsupported prompt source of type {type(source).__name__}.")
    for index, row in enumerate(rows):
        if not isinstance(row.get("prompt"), str):
            raise ValueError(f"{name}: row {index} has no string 'prompt' field: {row!r}")
    if not rows:
        raise ValueError(f"{name}: no prompts.")
    _resolve_images(rows, name, base_dir or os.getcwd())
    return rows


def _resolve_images(rows: list[PromptRow], name: str, base_dir: str) -> None:
    """Normalise each row's `"image"` in place to `None` or a list of PIL images and absolute paths, checking that
    every path is a readable image (one line naming the row and the file otherwise)."""
    for index, row in enumerate(rows):
        value = row.get(IMAGE_FIELD)
        if IMAGE_FIELD not in row:
            continue
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        items = [item for item in items if item is not None and item != ""]
        if not items:
            row[IMAGE_FIELD] = None
            continue
        where = f"{name}: row {index} ({row['prompt']!r})"
        resolved = []
        for item in items:
            if isinstance(item, Mapping) and (item.get("bytes") or item.get("path")):  # an undecoded datasets.Image
                item = PIL.Image.open(io.BytesIO(item["bytes"])) if item.get("bytes") else item["path"]
            if isinstance(item, os.PathLike):
                item = os.fspath(item)
            if isinstance(item, str):
                path = os.path.normpath(os.path.join(base_dir, os.path.expanduser(item)))
                if not os.path.isfile(path):
                    raise ValueError(f"{where}: input image '{path}' does not exist.")
                try:
                    with PIL.Image.open(path) as image:
                        image.verify()
                except Exception as error:  # PIL raises many types for broken files
                    raise ValueError(f"{where}: input image '{path}' is not a readable image ({error}).") from None
                item = path
            elif not isinstance(item, PIL.Image.Image):
                raise ValueError(
                    f"{where}: 'image' must be a PIL image, a path or a datasets.Image value (or a list of them), "
                    f"got {type(item).__name__}."
                )
            resolved.append(item)
        row[IMAGE_FIELD] = resolved


def row_images(row: Mapping[str, Any]) -> list[PIL.Image.Image] | None:
    """A row's input images as PIL images (paths loaded as `diffusers.utils.load_image` does: EXIF-rotated, RGB), or
    `None` for a text-only row."""
    value = row.get(IMAGE_FIELD)
    if not value:
        return None
    from diffusers.utils import load_image

    items = value if isinstance(value, (list, tuple)) else [value]
    return [load_image(item) if isinstance(item, (str, os.PathLike)) else item for item in items]


def image_digest(images: list[PIL.Image.Image] | None) -> str | None:
    """A hash of the images' pixels, size and mode (not their file names): the cache key of a row's conditioning."""
    if not images:
        return None
    digest = hashlib.sha256()
    for image in images:
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


# Local data files that `datasets` reads with a packaged builder.
_BUILDERS = {".csv": "csv", ".json": "json", ".parquet": "parquet"}


def _load_path(source: str, name: str) -> list[PromptRow]:
    extension = os.path.splitext(source)[1].lower()
    if extension in (".txt", ".jsonl", *_BUILDERS) and not os.path.isfile(source):
        what = "is a folder, not a file" if os.path.isdir(source) else "does not exist"
        raise ValueError(f"{name}: prompt file '{source}' {what}.")
    if extension == ".txt":
        rows = [{"prompt": line.strip()} for _, line in _lines(source, name) if line.strip()]
        if not rows:
            raise ValueError(f"{name}: prompt file '{source}' has no prompts (one per line).")
        return rows
    if extension == ".jsonl":
        rows = []
        for number, line in _lines(source, name):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{name}: {source} line {number} is not valid JSON: {error}") from error
            if not isinstance(row, dict):
                raise ValueError(f"{name}: {source} line {number} is not a JSON object: {line.strip()!r}")
            if not isinstance(row.get("prompt"), str):
                raise ValueError(
                    f"{name}: {source} line {number} has no string 'prompt' field: {line.strip()[:120]!r}"
                )
            rows.append(row)
        if not rows:
            raise ValueError(f"{name}: prompt file '{source}' has no prompts (one JSON object per line).")
        return rows
    folder = os.path.dirname(os.path.abspath(source))
    if extension in _BUILDERS:
        dataset = load_prompt_dataset(_BUILDERS[extension], data_files=source, name=name)
        return load_prompt_source(dataset, name, base_dir=folder)
    if extension and _looks_like_file(source):
        # Not a Hub dataset id: say so now rather than after a Hub look-up (which waits for the network offline).
        accepted = ", ".join([".txt", ".jsonl", *_BUILDERS])
        what = "" if os.path.isfile(source) else " (and does not exist)"
        raise ValueError(
            f"{name}: prompt file '{source}' has an unsupported extension '{extension}'{what}; accepted: {accepted} "
            "(or a dataset folder, a Hub dataset id, a registered name)."
        )
    # `id:split` picks a split; a local path is taken whole (it may itself contain ':').
    path, _, split = source.partition(":") if not os.path.exists(source) else (source, "", "")
    base_dir = source if os.path.isdir(source) else None
    return load_prompt_source(load_prompt_dataset(path, split=split or "train", name=name), name, base_dir=base_dir)


def _looks_like_file(source: str) -> bool:
    """A file (not a folder), or a name that cannot be a Hub dataset id (`owner/name`): no `/`, explicitly relative
    or absolute, or in an existing local folder."""
    if os.path.isdir(source):
        return False
    explicit = "/" not in source or source.startswith(("./", "../", "/", "~"))
    return os.path.isfile(source) or explicit or os.path.isdir(os.path.dirname(source))


def _lines(source: str, name: str):
    """`(line number, line)` of a UTF-8 text file; a byte that is not UTF-8 is an error naming the line."""
    with open(source, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{name}: {source} line {number} is not UTF-8 text ({error.reason}).") from None


def load_prompt_dataset(
    path: str,
    config_name: str | None = None,
    split: str = "train",
    data_files: Any = None,
    name: str = "prompts",
) -> datasets.Dataset:
    """Load a prompt dataset with `datasets`: a Hub dataset id, a local data folder, or a folder written by
    `Dataset.save_to_disk`.

    With `HF_HUB_OFFLINE=1`, a Hub dataset whose files are in the Hub cache (but that `datasets` never prepared) is
    read from that cache.

    Args:
        path: Dataset id, local folder, or builder name (`"json"`, `"csv"`, `"parquet"`) with `data_files`.
        config_name: Dataset configuration.
        split: Split to load.
        data_files: Data files for a builder name.
        name: What to call the source in error messages.

    Raises:
        ValueError: the dataset or split cannot be loaded.
    """
    try:
        if os.path.isdir(path) and _is_saved_to_disk(path):
            loaded = datasets.load_from_disk(path)
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"no split '{split}' (splits: {list(loaded)})")
                loaded = loaded[split]
            return loaded
        try:
            return datasets.load_dataset(path, config_name, split=split, data_files=data_files)
        except ConnectionError:
            if os.path.exists(path) or not _offline():
                raise
            # datasets cannot build a never-prepared Hub dataset offline, but huggingface_hub can find its files.
            from huggingface_hub import snapshot_download

            local = snapshot_download(path, repo_type="dataset")
            return datasets.load_dataset(local, config_name, split=split)
    except Exception as error:  # datasets raises many types; the message is what users need
        raise ValueError(f"{name}: could not load prompts from '{path}': {error}") from error


def _is_saved_to_disk(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, marker)) for marker in ("state.json", "dataset_dict.json"))


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "0").upper() in {
        "1",
        "ON",
        "YES",
        "TRUE",
    }


def prompts_by_task(train_dataset: Any) -> dict[str, list[PromptRow]]:
    """Normalise a training dataset into `{task: [rows]}`, keeping the tasks' first-seen order.

    Accepts a dataset with `"prompt"` and `"task"` columns (or a list of such rows), or a mapping
    `{task: source}` with any source `load_prompt_source` reads.
    """
    # A DatasetDict is a Mapping of splits, not of tasks.
    if isinstance(train_dataset, Mapping) and not isinstance(train_dataset, datasets.DatasetDict):
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


class MixedTaskPrompts(TorchDataset):
    """Item i is one mixed-task round for one device: `{task: rows}` for `tasks_per_round` task draws,
    `rows_per_round` rows in all, split as evenly as possible over the draws (the first draws take the remainder).

    Tasks are drawn uniformly without replacement, or with replacement and probability proportional to `weights`
    (`{task: weight}`, missing tasks weigh 1; a task drawn twice gets both draws' rows). Each task's rows come from its own seeded permutations in order, as in `RoundRobinPrompts`, so a task's
    prompts are all seen before any repeats. Items are a pure function of the index (resuming is exact; ranks get
    disjoint items); the draws of items 0..i are replayed once and cached to know where each task's cycle stands.

    Args:
        prompts: `{task: rows}`.
        tasks_per_round: Tasks per item (at most the number of tasks).
        rows_per_round: Rows per item (at least `tasks_per_round`).
        num_processes: World size W; the length is a multiple of it.
        seed: Seed of the draws and permutations.
        weights: Task weights for weighted draws; `None` draws uniformly.
    """

    def __init__(
        self,
        prompts: dict[str, list[PromptRow]],
        tasks_per_round: int,
        rows_per_round: int,
        num_processes: int,
        seed: int,
        weights: dict[str, float] | None = None,
    ):
        self.rounds = RoundRobinPrompts(prompts, 1, 1, seed)  # for its permutations
        self.prompts = prompts
        self.tasks = [task for task in prompts if weights is None or weights.get(task, 1.0) > 0]
        self.k = tasks_per_round if weights is not None else min(tasks_per_round, len(self.tasks))
        self.rows = rows_per_round
        self.seed = seed
        self.weights = None if weights is None else [float(weights.get(task, 1.0)) for task in self.tasks]
        total = sum(len(prompts[task]) for task in self.tasks)
        per_round = rows_per_round * num_processes
        self.length = max(1, -(-total // per_round)) * num_processes
        self._plans: list[list[tuple[str, int, int]]] = []  # per item: (task, first position, count)
        self._positions = dict.fromkeys(self.tasks, 0)

    def __len__(self) -> int:
        return self.length

    def _draw(self, index: int) -> list[str]:
        rng = random.Random(f"{self.seed}-mixed-{index}")
        if self.weights is None:
            return rng.sample(self.tasks, self.k)
        # with replacement, so that a task's expected share of the rows is exactly its share of the weights
        return rng.choices(self.tasks, weights=self.weights, k=self.k)

    def plan(self, index: int) -> list[tuple[str, int, int]]:
        """`(task, first position in its cycle, rows)` of item `index`."""
        while len(self._plans) <= index:
            tasks = self._draw(len(self._plans))
            share, extra = divmod(self.rows, len(tasks))
            plan = []
            for position, task in enumerate(tasks):
                count = share + (position < extra)
                plan.append((task, self._positions[task], count))
                self._positions[task] += count
            self._plans.append(plan)
        return self._plans[index]

    def __getitem__(self, index: int) -> dict[str, list[PromptRow]]:
        item = {}
        for task, start, count in self.plan(index):
            rows = self.prompts[task]
            chosen = []
            for position in range(start, start + count):
                epoch, offset = divmod(position, len(rows))
                chosen.append(rows[self.rounds._permutation(task, epoch)[offset]])
            item.setdefault(task, []).extend(chosen)
        return item
