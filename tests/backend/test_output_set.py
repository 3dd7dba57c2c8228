"""files.OutputSet: a folder holds one run's complete outputs or the earlier run's, never a mix,
never neither; the user's own files in it are never touched; two runs never write into it at once."""
from __future__ import annotations

import os

import pytest

from file_checks import leftovers, snapshot
from sds_backend import files
from sds_backend.files import OutputError, OutputSet

NAMES = ("weights.json", "texture.png", "head.glb")


def earlier_run(folder):
    folder.mkdir()
    (folder / "notes.txt").write_text("the user's own")
    (folder / "weights.json").write_text("old weights")
    (folder / "head.glb").write_text("old head")
    return snapshot(folder)


def write_new_set(outputs: OutputSet, names=("weights.json", "texture.png")) -> None:
    for name in names:
        outputs.path(name).write_text(f"new {name}")


def test_commit_replaces_the_whole_earlier_set_and_keeps_the_users_files(tmp_path):
    earlier_run(tmp_path / "out")
    outputs = OutputSet(tmp_path / "out", NAMES, replace=True).prepare()
    write_new_set(outputs)
    written = outputs.commit()
    assert sorted(written) == ["texture.png", "weights.json"]
    contents = {p.name: p.read_text() for p in (tmp_path / "out").iterdir()}
    # head.glb of the earlier run is gone: it would not belong with the new weights
    assert contents == {"notes.txt": "the user's own", "weights.json": "new weights.json",
                        "texture.png": "new texture.png"}
    assert not leftovers(tmp_path)


def test_a_move_failing_halfway_through_commit_leaves_the_earlier_set_exactly(tmp_path, monkeypatch):
    before = earlier_run(tmp_path / "out")
    outputs = OutputSet(tmp_path / "out", NAMES, replace=True).prepare()
    write_new_set(outputs)
    real_replace, calls = os.replace, []

    def failing_replace(source, target):
        calls.append(target)
        if len(calls) == 4:          # two old files moved aside, one new file moved in, then a failure
            raise OSError(28, "No space left on device")
        return real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", failing_replace)
    with pytest.raises(OutputError, match="no space left on the device"):
        outputs.commit()
    monkeypatch.undo()
    assert len(calls) > 4, "the rollback moved files back"
    assert snapshot(tmp_path / "out") == before and not leftovers(tmp_path)


def test_earlier_outputs_that_cannot_be_moved_back_are_kept_and_named(tmp_path, monkeypatch):
    earlier_run(tmp_path / "out")
    outputs = OutputSet(tmp_path / "out", NAMES, replace=True).prepare()
    write_new_set(outputs)
    real_replace = os.replace

    def replace(source, target):
        if "texture.png" in str(target) or ".previous" in str(source):    # the new set fails, so does the way back
            raise OSError(5, "Input/output error")
        return real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OutputError, match=r"could not be moved back and are kept in .*\.previous") as raised:
        outputs.commit()
    monkeypatch.undo()
    kept = str(raised.value).rsplit("kept in ", 1)[1]
    assert sorted(os.listdir(kept)) == ["head.glb", "weights.json"]
    assert (tmp_path / "out" / "notes.txt").read_text() == "the user's own"


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    first = OutputSet(tmp_path / "out", NAMES).prepare()
    with pytest.raises(OutputError, match="another run is writing into"):
        OutputSet(tmp_path / "out", NAMES).prepare()
    write_new_set(first)
    first.commit()
    second = OutputSet(tmp_path / "out", NAMES, replace=True).prepare()     # the lock went with the commit
    second.discard()
    assert sorted(os.listdir(tmp_path / "out")) == ["texture.png", "weights.json"]


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_an_output_name_taken_by_something_else_than_a_file_is_refused_even_with_replace(tmp_path, kind):
    (tmp_path / "out").mkdir()
    if kind == "folder":
        (tmp_path / "out" / "head.glb").mkdir()
        (tmp_path / "out" / "head.glb" / "inside.txt").write_text("the user's own")
    else:
        os.mkfifo(tmp_path / "out" / "head.glb")
    before = snapshot(tmp_path / "out")
    with pytest.raises(OutputError, match=f"head.glb is a {'folder' if kind == 'folder' else 'FIFO'}"):
        OutputSet(tmp_path / "out", NAMES, replace=True).prepare()
    assert snapshot(tmp_path / "out") == before and not leftovers(tmp_path)


def test_discard_removes_only_the_folders_it_made(tmp_path):
    outputs = OutputSet(tmp_path / "made" / "by" / "run", NAMES).prepare()
    write_new_set(outputs)
    outputs.discard()
    assert os.listdir(tmp_path) == []


def test_check_output_file_probes_the_path_it_will_write(tmp_path):
    (tmp_path / "scene.blend").write_text("the user's scene")
    assert files.check_output_file(tmp_path / "new.blend", "--save", False) == tmp_path / "new.blend"
    assert files.check_output_file(tmp_path / "scene.blend", "--save", True) == tmp_path / "scene.blend"
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        files.check_output_file(tmp_path / "scene.blend", "--save", False)
    with pytest.raises(OutputError, match="does not exist"):
        files.check_output_file(tmp_path / "no" / "x.blend", "--save", True)
    with pytest.raises(OutputError, match="too long"):
        files.check_output_file(tmp_path / ("x" * 300), "--save", True)
    assert sorted(os.listdir(tmp_path)) == ["scene.blend"]
