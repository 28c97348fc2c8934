"""The one publish protocol: a step's outputs are published as a whole."""

from __future__ import annotations

import json
import logging

from utils.publish import PUBLISH_PREFIX, claim_output_dir, release_output_dir, staged_outputs

NAMES = ["a.txt", "eval/b.csv", "c_hf"]


def test_an_output_of_an_earlier_run_not_written_now_goes(tmp_path, caplog):
    out = tmp_path / "out"
    with staged_outputs(out, NAMES, overwrite=False) as tmp:
        (tmp / "a.txt").write_text("first")
        (tmp / "eval").mkdir()
        (tmp / "eval" / "b.csv").write_text("x\n1\n")
        (tmp / "c_hf").mkdir()
        (tmp / "c_hf" / "data.arrow").write_text("arrow")
    (out / "mine.txt").write_text("the user's")
    with caplog.at_level(logging.WARNING, logger="cell2sentence"), \
            staged_outputs(out, NAMES, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("second")
    assert (out / "a.txt").read_text() == "second"
    assert not (out / "eval" / "b.csv").exists() and not (out / "c_hf").exists()
    assert (out / "mine.txt").read_text() == "the user's"  # not an output of the step
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "eval", "mine.txt"]  # no staging, lock or trash left
    assert [r.getMessage() for r in caplog.records] == [
        f"Removed {out / 'eval' / 'b.csv'}, an output of an earlier run not written now.",
        f"Removed {out / 'c_hf'}, an output of an earlier run not written now.",
    ]


def test_a_publish_cut_short_by_an_earlier_version_is_finished(tmp_path):
    """A ``.publish-*`` folder whose names file is the earlier list form (nothing retired)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old")
    (out / "eval").mkdir()
    (out / "eval" / "b.csv").write_text("old b")
    committed = out / (PUBLISH_PREFIX + "x")
    committed.mkdir()
    (committed / "a.txt").write_text("new")
    (committed / ".names.json").write_text(json.dumps(["a.txt"]))
    claim_output_dir(out)
    release_output_dir(out)
    assert (out / "a.txt").read_text() == "new"
    assert (out / "eval" / "b.csv").read_text() == "old b"
    assert not list(out.glob(".publish-*")) and not list(out.glob(".trash-*"))
