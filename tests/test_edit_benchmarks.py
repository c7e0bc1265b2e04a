"""Smoke checks of the editing benchmarks: each code path runs on its small preset."""

from benchmarks import edit_memory, edit_round


def test_edit_round_quick(capsys):
    assert edit_round.main(["--quick", "--no-write"]) == 0
    out = capsys.readouterr().out
    for key in ("t2i-cache-on", "t2i-cache-off", "edit-cache-on", "edit-cache-off"):
        assert f"[edit_round] {key}: " in out


def test_edit_memory_counts_the_reference_tokens():
    act = edit_memory.saved_activations_per_row("flux2-klein-base-4b", 512, 128, checkpointing=True)
    assert act["tokens"] == 32 * 32 + 64 * 64 + 128
    assert 3.8 < act["params_b"] < 3.95 and act["without_attention_probs_gib"] > 0
