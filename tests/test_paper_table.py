"""`benchmarks.paper_table --quick`: every row of the paper's comparison trains and is scored, the student beats the
base, and a second run reuses the cached rows."""

import json

from PIL import Image

from benchmarks import paper_table
from benchmarks.paper_table import TableSettings


def test_quick_table_has_every_row_and_the_student_beats_the_base(tmp_path):
    settings = TableSettings.quick()
    out = paper_table.run(settings, workers=1, cache_dir=tmp_path / "cache", write=False, progress=False)
    rows = out["rows"]
    assert [row["row"] for row in rows] == [
        "base",
        "teacher: aesthetic",
        "teacher: composition",
        "teacher: letters",
        "multi-task GRPO-Guard",
        "multi-task DiffusionNFT",
        "cascade RL (composition → letters → aesthetic)",
        "off-policy distillation (flow matching on teacher samples)",
        "DiffusionOPD (student)",
        "DiffusionOPD from a merge (svd r16, w 1/3)",
        "merge: weighted sum of deltas (cat, w 1/3)",
        "merge: DARE on deltas (density 0.5, w 1/3, r24)",
    ]
    by_kind = {row["kind"]: row for row in rows if row["kind"] != "teacher"}
    for row in rows:
        assert 0 < row["average"] < 1 and row["sem"] > 0
    # Paired with the base (same scenes, same noise): +0.061 to +0.089 over seeds 0-4 on this quick path.
    assert by_kind["opd"]["average"] > by_kind["base"]["average"] + 0.01
    # Costs: measured for the trained rows, recorded for the teachers, none for the base; the Stage-1 cost is added
    # to the rows that need the teachers.
    assert by_kind["base"]["train_s"] == 0
    assert all(row["train_s"] > 0 for row in rows if row["kind"] != "base")
    teachers = sum(paper_table.recorded_teacher_seconds(task) for task in paper_table.TASKS)
    assert by_kind["opd"]["with_teachers_s"] == by_kind["opd"]["train_s"] + teachers
    assert by_kind["multitask_nft"]["with_teachers_s"] is None

    table = paper_table.to_markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "| DiffusionOPD (student) |" in table
    png = paper_table.bar_chart(rows, tmp_path / "table.png")
    assert Image.open(png).size == (1100, 520)

    # Resumed: every job comes from the cache (its file untouched), with the same scores.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*/result.json")}
    assert len(stamps) == len(paper_table.jobs(settings))
    again = paper_table.run(settings, workers=1, cache_dir=tmp_path / "cache", write=False, progress=False)
    assert again["rows"] == rows
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # ... unless a setting the job depends on changed: then only those jobs are redone.
    changed = TableSettings.quick()
    changed.opd_rounds = 1
    paper_table.run(changed, workers=1, cache_dir=tmp_path / "cache", write=False, progress=False)
    redone = {p.parent.name for p in stamps if p.stat().st_mtime_ns != stamps[p]}
    assert redone == {"opd-seed0", "opd_from_merge-seed0"}  # both students train for `opd_rounds`
    assert json.loads((tmp_path / "cache" / "opd-seed0" / "result.json").read_text())["settings"]["opd_rounds"] == 1
