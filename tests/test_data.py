"""Prompt sources per task: txt, jsonl (metadata kept), data files, `datasets` objects, local and Hub datasets."""

import json

import datasets
import pytest
from huggingface_hub import constants as hub_constants

from trl_diffusion_opd.data import RoundRobinPrompts, load_prompt_dataset, load_prompt_source, prompts_by_task
from trl_diffusion_opd.testing import save_to_hub_cache


GENEVAL_ROWS = [
    {"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "a photo of two cats"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
    {"tag": "position", "include": [{"class": "dog", "count": 1}], "exclude": [], "prompt": "a dog left of a cup"},
]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Keep what `datasets` prepares out of the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))


@pytest.fixture
def sources(tmp_path):
    txt = tmp_path / "ocr_train.txt"
    txt.write_text('A sign that says "open"\n\n  The word "cat" on a mug  \nA poster that says "sale"\n')
    jsonl = tmp_path / "geneval_metadata.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in GENEVAL_ROWS) + "\n\n")
    return {"txt": txt, "jsonl": jsonl}


def test_txt_one_prompt_per_line(sources):
    rows = load_prompt_source(str(sources["txt"]))
    assert rows == [
        {"prompt": 'A sign that says "open"'},
        {"prompt": 'The word "cat" on a mug'},
        {"prompt": 'A poster that says "sale"'},
    ]


def test_jsonl_keeps_metadata(sources):
    assert load_prompt_source(sources["jsonl"]) == GENEVAL_ROWS  # a PathLike works too


def test_datasets_object_keeps_extra_columns():
    dataset = datasets.Dataset.from_list([{"prompt": "a cat", "score": 0.5}, {"prompt": "a dog", "score": 0.25}])
    assert load_prompt_source(dataset) == [{"prompt": "a cat", "score": 0.5}, {"prompt": "a dog", "score": 0.25}]
    streamed = datasets.IterableDataset.from_generator(lambda: iter([{"prompt": "a bird", "id": 3}]))
    assert load_prompt_source(streamed) == [{"prompt": "a bird", "id": 3}]


def test_one_source_per_task(sources):
    aes = datasets.Dataset.from_dict({"prompt": ["a sunset", "a portrait"], "style": ["photo", "oil"]})
    grouped = prompts_by_task(
        {
            "geneval": str(sources["jsonl"]),
            "ocr": str(sources["txt"]),
            "aes": aes,
            "extra": ["a tree", {"prompt": "x"}],
        }
    )
    assert list(grouped) == ["geneval", "ocr", "aes", "extra"]
    assert grouped["geneval"] == GENEVAL_ROWS
    assert [row["prompt"] for row in grouped["ocr"]] == [
        'A sign that says "open"',
        'The word "cat" on a mug',
        'A poster that says "sale"',
    ]
    assert grouped["aes"] == [{"prompt": "a sunset", "style": "photo"}, {"prompt": "a portrait", "style": "oil"}]
    assert grouped["extra"] == [{"prompt": "a tree"}, {"prompt": "x"}]


def test_dataset_with_task_column_is_split_by_task():
    dataset = datasets.Dataset.from_list(
        [
            {"prompt": "two cats", "task": "geneval", "tag": "counting"},
            {"prompt": 'a sign "hi"', "task": "ocr", "tag": None},
            {"prompt": "a red car", "task": "geneval", "tag": "colors"},
        ]
    )
    grouped = prompts_by_task(dataset)
    assert list(grouped) == ["geneval", "ocr"]  # first-seen order
    assert [(r["prompt"], r["tag"]) for r in grouped["geneval"]] == [("two cats", "counting"), ("a red car", "colors")]
    assert grouped["ocr"] == [{"prompt": 'a sign "hi"', "task": "ocr", "tag": None}]


def test_jsonl_with_task_field_as_single_source(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        '{"prompt": "two cats", "task": "geneval", "include": [{"class": "cat", "count": 2}]}\n'
        '{"prompt": "a sign", "task": "ocr"}\n'
    )
    grouped = prompts_by_task(str(path))
    assert grouped["geneval"] == [{"prompt": "two cats", "task": "geneval", "include": [{"class": "cat", "count": 2}]}]
    assert grouped["ocr"] == [{"prompt": "a sign", "task": "ocr"}]


def test_dataset_dict_uses_train_split_not_splits_as_tasks():
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"prompt": ["a", "b"], "task": ["x", "y"]}),
            "test": datasets.Dataset.from_dict({"prompt": ["c"], "task": ["x"]}),
        }
    )
    grouped = prompts_by_task(splits)
    assert grouped == {"x": [{"prompt": "a", "task": "x"}], "y": [{"prompt": "b", "task": "y"}]}


def test_local_dataset_folders_and_files(tmp_path):
    rows = [{"prompt": "a cat", "task": "geneval", "n": 1}, {"prompt": "a sign", "task": "ocr", "n": 2}]
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    assert load_prompt_source(str(saved)) == rows

    data_folder = tmp_path / "data"
    data_folder.mkdir()
    (data_folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert load_prompt_source(str(data_folder)) == rows

    csv = tmp_path / "prompts.csv"
    csv.write_text("prompt,task\na cat,geneval\na sign,ocr\n")
    assert prompts_by_task(str(csv)) == {
        "geneval": [{"prompt": "a cat", "task": "geneval"}],
        "ocr": [{"prompt": "a sign", "task": "ocr"}],
    }


def test_hub_dataset_id_offline_from_cache(tmp_path, monkeypatch):
    files = tmp_path / "repo"
    files.mkdir()
    (files / "train.jsonl").write_text('{"prompt": "a cat", "task": "geneval", "tag": "single_object"}\n')
    (files / "test.jsonl").write_text('{"prompt": "a dog", "task": "geneval", "tag": "single_object"}\n')
    cache = tmp_path / "hub-cache"
    save_to_hub_cache(files, "org/opd-prompts", cache, repo_type="dataset")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert prompts_by_task("org/opd-prompts") == {
        "geneval": [{"prompt": "a cat", "task": "geneval", "tag": "single_object"}]
    }
    assert load_prompt_source("org/opd-prompts:test") == [
        {"prompt": "a dog", "task": "geneval", "tag": "single_object"}
    ]
    assert load_prompt_dataset("org/opd-prompts", split="test")["prompt"] == ["a dog"]
    with pytest.raises(ValueError, match="could not load prompts from 'org/missing'"):
        load_prompt_source("org/missing")


def test_round_robin_rows_carry_metadata(sources):
    prompts = prompts_by_task({"geneval": str(sources["jsonl"]), "ocr": str(sources["txt"])})
    rounds = RoundRobinPrompts(prompts, prompts_per_task=2, num_processes=1, seed=0)
    seen = [row for index in range(len(rounds)) for row in rounds[index]["geneval"]]
    assert all(row in GENEVAL_ROWS for row in seen)
    assert {row["tag"] for row in seen} <= {"counting", "colors", "position"}


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("missing.txt", "prompt file 'missing.txt' does not exist"),
        (datasets.Dataset.from_dict({"text": ["a"]}), "no 'prompt' column"),
        ([{"caption": "a"}], "row 0 has no string 'prompt' field"),
        ([1, 2], "item 0 is neither a prompt string nor a row dict"),
        ([], "no prompts"),
        (datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"prompt": ["a"]})}), "no 'train' split"),
    ],
)
def test_bad_sources_raise_clear_errors(source, message):
    with pytest.raises(ValueError, match=message):
        load_prompt_source(source, "task 'ocr'")


def test_bad_jsonl_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n"just a string"\n')
    with pytest.raises(ValueError, match="line 2 is not a JSON object"):
        load_prompt_source(str(path))
    path.write_text('{"prompt": "ok"}\n{broken\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_prompt_source(str(path))


def test_rows_without_task_column():
    with pytest.raises(ValueError, match="row 0 has no 'task' field"):
        prompts_by_task(datasets.Dataset.from_dict({"prompt": ["a"]}))


def test_world_prompt_sources():
    train = load_prompt_source("world:letters")
    heldout = load_prompt_source("world:composition:heldout")
    assert len(train) == 2048 and {row["task"] for row in train} == {"letters"}
    assert train[0]["prompt"].startswith("the letter ")
    assert len(heldout) == 96 and {row["task"] for row in heldout} == {"composition"}
    assert load_prompt_source("world:letters") == train  # deterministic
    for bad in ("world:ocr", "world:letters:test", "world:letters:heldout:x"):
        with pytest.raises(ValueError, match="world:<task>"):
            load_prompt_source(bad)
