"""The lab under faults (issue 13): every fault ends in one clear message, and a run
that can be recovered says exactly how."""

import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bnlab.run_folder as bnio
from bnlab.cli import main
from bnlab.experiments.runner import prepare_out_dir

TINY = ["--steps", "120", "--seeds", "2", "--eval-every", "40", "--checkpoint-every", "40"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "run"
    assert main(["reproduce", "figure1", *TINY, "--quiet", "--out", str(out)]) == 0
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


# --- the output folder, checked before any training -----------------------------------


def test_out_under_a_file_is_one_message(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    out = tmp_path / "afile" / "run"
    assert main(["reproduce", "figure1", *TINY, "--quiet", "--out", str(out)]) == 2
    assert f"{tmp_path / 'afile'} is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's read-only /sys")
def test_out_on_a_read_only_file_system_is_one_message(capsys):
    out = Path("/sys/kernel/bnlab-run")  # sysfs: no new files, even for root
    assert main(["reproduce", "figure1", *TINY, "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write in {out}" in err and "choose a writable --out" in err
    assert "Traceback" not in err


def test_default_runs_folder_in_a_read_only_current_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "runs").write_text("a file where runs/ would go")
    monkeypatch.chdir(tmp_path)
    assert main(["reproduce", "figure1", *TINY, "--quiet"]) == 2
    assert "runs is a file, not a folder" in capsys.readouterr().err


def test_train_ddp_checks_out_before_training(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    t0 = time.perf_counter()
    assert main(["train-ddp", "--steps", "100000", "--out", str(tmp_path / "afile" / "m.pt")]) == 2
    assert time.perf_counter() - t0 < 30  # refused up front, not after 100,000 steps
    assert "is a file, not a folder" in capsys.readouterr().err


# --- resume ---------------------------------------------------------------------------


def test_resume_of_a_folder_without_a_run_is_refused(tmp_path, capsys):
    out = tmp_path / "typo"
    assert main(["reproduce", "figure1", *TINY, "--quiet", "--resume", "--out", str(out)]) == 2
    assert "nothing to continue" in capsys.readouterr().err
    assert not out.exists()  # no fresh run started in its place


def test_resume_accepts_the_same_data_folder_written_another_way(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"experiment": "x", "config": {"data": "data"}}))
    assert prepare_out_dir(out, "x", {"data": str(tmp_path / "data")}, resume=True)
    assert prepare_out_dir(out, "x", {"data": "./data/"}, resume=True)
    with pytest.raises(ValueError, match="another configuration"):
        prepare_out_dir(out, "x", {"data": str(tmp_path / "other")}, resume=True)


def test_checkpoint_of_the_other_arm_is_named(tiny_run, tmp_path, capsys):
    run = _copy(tiny_run, tmp_path)
    shutil.copy(run / "work" / "bn.pt", run / "work" / "baseline.pt")
    args = ["reproduce", "figure1", *TINY, "--quiet", "--workers", "1", "--resume"]
    assert main([*args, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "belongs to arm 'bn', not 'baseline'" in err and "num_features" not in err
    (run / "work" / "baseline.pt").unlink()  # what the message says, which then recovers
    assert main([*args, "--out", str(run)]) == 0


def test_a_resumed_run_starts_clean_of_old_worker_errors(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    (run / "work" / "bn.error").write_text("OSError: an old failure, fixed since")
    (run / "work" / "baseline.error").write_text("")  # as left by a full disk
    args = ["reproduce", "figure1", *TINY, "--quiet", "--resume", "--out", str(run)]
    assert main(args) == 0
    assert not list((run / "work").glob("*.error"))


def test_a_worker_that_cannot_write_its_error_is_reported_by_exit_status(tmp_path):
    from bnlab.experiments.runner import WorkerError, run_experiment

    sys.path.insert(0, str(Path(__file__).parent))  # the spawned workers inherit it
    try:
        with pytest.raises(WorkerError) as e:
            run_experiment(_faulty_experiment(), _faulty_config(), tmp_path / "run",
                           progress=False, log=lambda *a: None)  # fmt: skip
    finally:
        sys.path.remove(str(Path(__file__).parent))
    # The pool fails fast, so whichever arm ended first is the one named.
    assert re.search(
        r"\b[ab]: the worker exited with status 1 \(its error is above\)", str(e.value)
    )


def _faulty_experiment():
    from bnlab.lab import Experiment
    from bnlab.report import figure1 as any_report  # never reached: every arm fails

    sys.path.insert(0, str(Path(__file__).parent))
    import faulty_experiment

    sys.path.remove(str(Path(__file__).parent))
    return Experiment("faulty", "faulty", "fails", faulty_experiment, any_report)


def _faulty_config():
    sys.path.insert(0, str(Path(__file__).parent))
    import faulty_experiment

    sys.path.remove(str(Path(__file__).parent))
    return faulty_experiment.Config()


def test_full_disk_while_the_report_is_written(tiny_run, tmp_path, monkeypatch, capsys):
    run = _copy(tiny_run, tmp_path)

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("bnlab.report.render.atomic_write_text", full)
    args = ["reproduce", "figure1", *TINY, "--quiet", "--resume", "--out", str(run)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"no space left on device while writing {run / 'report.md'}" in err
    assert err.strip().endswith("--resume") and "Traceback" not in err


# --- records --------------------------------------------------------------------------


def test_torn_last_record_is_reported_with_its_file_and_line(tiny_run, tmp_path, capsys):
    run = _copy(tiny_run, tmp_path)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    with pytest.warns(bnio.TornRecordWarning) as caught:
        assert main(["report", str(run)]) == 0
    assert f"{metrics}, line {len(lines)}: a torn record" in str(caught[0].message)


def test_json_errors_name_the_file_and_line(tiny_run, tmp_path, capsys):
    run = _copy(tiny_run, tmp_path)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[2] = lines[2][:10]
    metrics.write_text("\n".join(lines) + "\n")
    assert main(["report", str(run)]) == 2
    assert f"{metrics}, line 3, column" in capsys.readouterr().err
    config = run / "config.json"
    config.write_text(config.read_text().replace('"config"', '"config" 1', 1))
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{config}, line " in err and "line 1, column" not in err


# --- a full disk ----------------------------------------------------------------------


class _FullDisk(io.RawIOBase):
    """A file whose writes fail as on a full disk once ``room`` bytes are written."""

    def __init__(self, room: int):
        self.room = room

    def writable(self):
        return True

    def write(self, b):
        self.room -= len(b)
        if self.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return len(b)


def test_a_checkpoint_on_a_full_disk_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    # torch.save alone says "[enforce fail at inline_container.cc] unexpected pos"
    real_fdopen = os.fdopen
    monkeypatch.setattr(
        bnio.os, "fdopen", lambda fd, mode: (real_fdopen(fd, mode), _FullDisk(1000))[1]
    )
    with pytest.raises(OSError) as e:
        bnio.save_checkpoint(tmp_path / "c.pt", {"step": 1, "x": bnio.torch.zeros(10_000)})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "c.pt")
    assert "unexpected pos" not in str(e.value)
    assert not list(tmp_path.iterdir())  # no partial file left


def test_full_disk_during_training_says_so_and_how_to_resume(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real_save = bnio.save_checkpoint

    def save_on_filling_disk(path, state):  # the second checkpoint finds the disk full
        calls["n"] += 1
        if calls["n"] == 2:
            bnio._atomic(path, lambda f: bnio.torch.save(state, _FullDisk(1000)))
        real_save(path, state)

    monkeypatch.setattr("bnlab.train.loop.save_checkpoint", save_on_filling_disk)
    out = tmp_path / "run"
    args = ["reproduce", "figure1", *TINY, "--quiet", "--workers", "1", "--out", str(out)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "no space left on device while writing" in err and "unexpected pos" not in err
    resume = err.strip().splitlines()[-1].split()
    assert resume[:3] == ["bnlab", "reproduce", "figure1"] and resume[-1] == "--resume"
    monkeypatch.undo()  # space freed: the printed command finishes the run
    assert main(resume[1:]) == 0
    assert (out / "report.html").exists()


# --- options --------------------------------------------------------------------------


@pytest.mark.parametrize("experiment", ["figure1", "inception"])
@pytest.mark.parametrize("flag,value", [("--workers", "0"), ("--timeout", "-1")])
def test_workers_and_timeout_must_be_positive(experiment, flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["reproduce", experiment, flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: must be" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [
        ["reproduce", "figure1"],
        ["reproduce", "inception"],
        ["data", "download", "mnist"],
        ["train-ddp"],
        ["reproduce", "lr-init"],
        ["reproduce", "batch-size"],
    ],  # fmt: skip
)
def test_help_shows_each_default_once(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # undo the line wrapping
    assert "(default: None)" not in text and "(default: False)" not in text
    for entry in text.split(" --")[1:]:
        assert entry.count("default") <= 1, f"default given twice: --{entry}"


def test_unknown_flag_shows_the_subcommand_usage(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "figure1", "--no-such-flag"])
    err = capsys.readouterr().err
    assert "usage: bnlab reproduce figure1" in err and "--no-such-flag" in err


# --- interruption (subprocesses: real signals) ----------------------------------------


def _launch(*args):
    exe = Path(sys.executable).with_name("bnlab")
    return subprocess.Popen(
        [str(exe), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's job
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not path.exists():
        time.sleep(0.2)
    assert path.exists(), f"{path} did not appear within {timeout} s"


LONG = ["reproduce", "figure1", "--steps", "200000", "--seeds", "1", "--eval-every", "200",
        "--checkpoint-every", "200"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interruption_prints_the_resume_command_which_resumes(tmp_path, sig):
    out = tmp_path / "run"
    p = _launch(*LONG, "--out", str(out))
    _wait_for(out / "work" / "bn.pt")
    if sig == signal.SIGINT:
        os.killpg(p.pid, sig)  # Ctrl-C reaches the whole process group
    else:
        os.kill(p.pid, sig)  # a scheduler's SIGTERM reaches the launcher alone
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig
    assert f"kept in {out}" in err
    command = err.strip().splitlines()[-1].split()
    assert command == ["bnlab", *LONG, "--out", str(out), "--resume"]
    assert "leaked semaphore" not in err and "Traceback" not in err
    p = _launch(*command[1:])
    try:
        _wait_for(out / "work" / "bn.jsonl")
        deadline = time.time() + 60
        lines = ""
        while time.time() < deadline and "resumed from step" not in lines:
            lines += p.stdout.readline()
        assert "bn: resumed from step" in lines or "baseline: resumed from step" in lines
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()


@pytest.mark.slow
def test_a_killed_worker_is_named_with_its_signal(tmp_path):
    out = tmp_path / "run"
    p = _launch(*LONG, "--out", str(out), "--quiet")
    _wait_for(out / "work" / "bn.jsonl")
    _wait_for(out / "work" / "baseline.jsonl")
    children = [
        int(d.name)
        for d in Path("/proc").iterdir()
        if d.name.isdigit()
        and (d / "stat").exists()
        and _ppid(d) == p.pid
        and b"spawn_main" in (d / "cmdline").read_bytes()
    ]
    assert len(children) == 2
    os.kill(children[0], signal.SIGKILL)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1
    assert "the worker was killed by SIGKILL" in err
    assert "details in" not in err  # it wrote nothing to point at


def _ppid(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


# --- the run folder's lock ---------------------------------------------------------------


def test_the_folder_lock_names_its_holder_and_dies_with_it(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    with bnio.locked_folder(folder):
        with pytest.raises(bnio.FolderLockedError, match=rf"in use by .*pid {os.getpid()} on"):
            with bnio.locked_folder(folder):
                pass
    with bnio.locked_folder(folder):  # released on exit
        pass
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, bnlab.run_folder as r\n"
         f"with r.locked_folder({str(folder)!r}):\n print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(bnio.FolderLockedError, match=rf"pid {holder.pid} on"):
            with bnio.locked_folder(folder):
                pass
    finally:
        holder.kill()  # no chance to clean up: the kernel releases the lock
        holder.wait()
    with bnio.locked_folder(folder):
        pass


@pytest.mark.slow
def test_a_second_run_into_a_busy_folder_is_refused_with_its_holder(tmp_path):
    """Two --resume runs into one --out both trained and wrote every record twice; a
    second fresh run was refused as 'already holds this run'. Now both name the holder."""
    out = tmp_path / "run"
    p = _launch(*LONG, "--out", str(out), "--quiet")
    try:
        _wait_for(out / "work" / "bn.pt")
        for extra in (["--resume"], []):
            second = _launch(*LONG, "--out", str(out), "--quiet", *extra)
            _, err = second.communicate(timeout=120)
            assert second.returncode == 2, err
            assert f"is in use by another bnlab run (pid {p.pid} on" in err, err
            assert "already holds this run" not in err and "Traceback" not in err
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # killed: its lock goes with it
        p.communicate()
    p = _launch(*LONG, "--out", str(out), "--resume")
    try:
        deadline, lines = time.time() + 90, ""
        while time.time() < deadline and "resumed from step" not in lines:
            lines += p.stdout.readline()
        assert "resumed from step" in lines
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
