"""The one writer (textgen/files.py): what it replaces, what it writes through, what it refuses."""
import errno
import os
import stat
import threading

import pytest
import torch

from textgen import files
from textgen.errors import OutputError, UsageError


def test_a_replaced_file_leaves_its_hard_linked_names_as_they_were(tmp_path):
    old = tmp_path / "notes.txt"
    old.write_text("the old text\n")
    other = tmp_path / "same-file.txt"
    os.link(old, other)
    files.write_text(str(old), "the new text\n")
    assert old.read_text() == "the new text\n" and other.read_text() == "the old text\n"
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_an_error_inside_the_block_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("kept\n")
    with pytest.raises(RuntimeError):
        with files.output(str(path)) as f:
            f.write("half of the new")
            raise RuntimeError("the generator failed")
    assert path.read_text() == "kept\n" and os.listdir(tmp_path) == ["out.txt"]


def test_ctrl_c_keeps_what_was_written_only_where_asked(tmp_path):
    for keep, expected in ((True, "so far"), (False, "old")):
        path = tmp_path / f"out-{keep}.txt"
        path.write_text("old")
        with pytest.raises(KeyboardInterrupt):
            with files.output(str(path), keep_on_interrupt=keep) as f:
                f.write("so far")
                raise KeyboardInterrupt
        assert path.read_text() == expected


def test_the_old_files_permissions_are_kept(tmp_path):
    path = tmp_path / "script.sh"
    path.write_text("echo old\n")
    path.chmod(0o751)
    files.write_text(str(path), "echo new\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o751


def test_a_link_to_a_file_writes_the_file_and_stays_a_link(tmp_path):
    target = tmp_path / "real.txt"
    target.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    files.write_text(str(link), "new")
    assert link.is_symlink() and target.read_text() == "new"


def test_a_fifo_is_written_through_and_stays_a_fifo(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo).read()))
    reader.start()
    files.write_text(str(fifo), "through the pipe\n")
    reader.join(10)
    assert got == ["through the pipe\n"] and stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_null_and_full_devices_are_written_through_never_replaced():
    files.write_text("/dev/null", "gone")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    with pytest.raises(OutputError, match="cannot write to /dev/full: no space left"):
        files.write_bytes("/dev/full", b"x" * 100_000)
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_a_checkpoint_is_refused_by_its_content_whatever_its_name(tmp_path):
    disguised = tmp_path / "notes.txt"
    torch.save({"weights": torch.ones(3)}, disguised)
    before = disguised.read_bytes()
    with pytest.raises(UsageError, match="is a checkpoint"):
        files.write_text(str(disguised), "text")
    assert disguised.read_bytes() == before
    files.write_bytes(str(disguised), b"the checkpoint writer itself may", replace="checkpoint")


def test_nothing_of_a_users_goes_into_a_run_folder_and_only_its_own_writer_replaces_its_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / files.RUN_MARK).write_text("123\n")
    (run / "config.json").write_text("{}")
    for name in ("config.json", "best.pt", "sample.txt"):       # best.pt new: it would break the run
        with pytest.raises(UsageError, match="in a training run's folder"):
            files.write_text(str(run / name), "overwritten")
    assert sorted(os.listdir(run)) == [files.RUN_MARK, "config.json"] and (run / "config.json").read_text() == "{}"
    files.write_text(str(run / "config.json"), '{"mine": 1}', replace="own")
    assert (run / "config.json").read_text() == '{"mine": 1}'


def test_a_run_folder_copied_without_its_dotfile_is_known_by_its_checkpoint(tmp_path):
    run = tmp_path / "copied"
    run.mkdir()
    torch.save({"format": "textgen"}, run / "latest.pt")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(UsageError, match="in a training run's folder"):
        files.write_text(str(run / "metrics.jsonl"), "text")


def test_a_link_is_judged_by_what_it_leads_to(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / files.RUN_MARK).write_text("123\n")
    (run / "config.json").write_text("{}")
    (tmp_path / "innocent.txt").symlink_to(run / "config.json")
    (tmp_path / "lock.txt").symlink_to(run / files.RUN_MARK)
    for link in ("innocent.txt", "lock.txt"):
        with pytest.raises(UsageError, match="in a training run's folder"):
            files.write_text(str(tmp_path / link), "text")
    assert (run / "config.json").read_text() == "{}" and (run / files.RUN_MARK).read_text() == "123\n"


def test_a_runs_own_writer_never_follows_a_link_or_writes_a_fifo(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    (run / "loss.png").symlink_to(tmp_path / "notes.txt")
    os.mkfifo(run / "metrics.jsonl")
    for name in ("loss.png", "metrics.jsonl"):
        with pytest.raises(UsageError, match="not a regular file"):
            files.write_text(str(run / name), "x", replace="own")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_dev_stdout_is_written_through_even_when_the_shell_appends_it_to_a_file(tmp_path):
    import subprocess
    import sys
    log = tmp_path / "app.log"
    log.write_text("line 1\nline 2\n")
    code = ("from textgen import files; files.write_text('/dev/stdout', 'generated\\n'); "
            "files.write_text('/proc/self/fd/1', 'again\\n')")
    with open(log, "a") as appended:
        subprocess.run([sys.executable, "-c", code], stdout=appended, check=True)
    assert log.read_text() == "line 1\nline 2\ngenerated\nagain\n"
    piped = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    assert piped.stdout == b"generated\nagain\n"


def test_a_name_at_the_filesystems_limit_still_gets_its_temporary(tmp_path):
    long_name = tmp_path / ("n" * 250 + ".txt")
    files.write_text(str(long_name), "fits")
    assert long_name.read_text() == "fits"


def test_a_folder_a_missing_folder_and_a_disk_device_are_one_sentence_each(tmp_path):
    with pytest.raises(UsageError, match="is a folder"):
        files.write_text(str(tmp_path), "x")
    with pytest.raises(UsageError, match="does not exist"):
        files.write_text(str(tmp_path / "nowhere" / "x.txt"), "x")
    disks = [os.path.join("/dev", n) for n in sorted(os.listdir("/dev"))
             if stat.S_ISBLK(os.stat(os.path.join("/dev", n)).st_mode)] if os.path.isdir("/dev") else []
    if disks:
        assert "is a disk" in files.refusal(disks[0])


def test_a_full_disk_while_writing_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out.txt"
    path.write_text("kept")
    with pytest.raises(OutputError, match=r"disk full while writing .*out.txt; .*out.txt was left as it was"):
        with files.output(str(path)) as f:
            f.write("new")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert path.read_text() == "kept" and os.listdir(tmp_path) == ["out.txt"]


def test_a_read_only_folder_is_one_sentence(tmp_path, monkeypatch):
    real_open = open

    def read_only(path, *args, **kwargs):
        if ".tmp-" in str(path):
            raise OSError(errno.EROFS, "Read-only file system", path)
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr("builtins.open", read_only)
    with pytest.raises(files.WriteError, match="cannot write .*x.txt: read-only file system; nothing was written"):
        files.write_text(str(tmp_path / "x.txt"), "x")


def test_link_replaces_a_name_with_another_name_of_the_source(tmp_path):
    source = tmp_path / "latest.pt"
    source.write_bytes(b"new")
    best = tmp_path / "best.pt"
    best.write_bytes(b"old")
    kept = tmp_path / "step-1.pt"
    os.link(best, kept)
    files.link(str(source), str(best))
    assert os.path.samefile(source, best) and kept.read_bytes() == b"old"
