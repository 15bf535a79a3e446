"""The CLI end to end: `hetmem train` (tiny: its report, checkpoints, bit-exact resume, errors,
the ops build before the first step), `hetmem --version`, `hetmem profile`, `hetmem report`."""
from __future__ import annotations

import json

import pytest

import hetmem
import hetmem.train_job as train_job
from hetmem.cli import main
from hetmem.ops.builder import OpBuilder

TINY = ["train", "--d-model", "64", "--layers", "2", "--heads", "2", "--block-size", "32", "--batch-size", "2",
        "--device", "cpu", "--device-budget", "1MiB", "--sample", "0", "--no-progress"]


def _losses(run) -> list[float]:
    return [entry["loss"] for entry in json.loads((run / "summary.json").read_text())["losses"]]


def test_train_writes_a_report_and_stays_in_budget(tmp_path, capsys):
    out = tmp_path / "run"
    code = main([*TINY, "--steps", "4", "--warmup-steps", "2", "--out", str(out), "--sample", "16"])
    assert code == 0
    text = capsys.readouterr().out
    assert "x the device budget" in text and "within budget" in text and "sample:" in text
    for name in ("trace.json", "report.txt", "report.html", "trace.chrome.json", "memory.png", "options.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert [e["step"] for e in summary["losses"]] == [1, 2, 3, 4]
    assert all(e["loss"] > 0 for e in summary["losses"])
    # linear warm-up over 2 steps, then cosine from --lr over the remaining 2
    lr = train_job.TrainOptions().lr
    assert [e["lr"] for e in summary["losses"]] == pytest.approx([lr / 2, lr, lr, lr * (0.1 + 0.9 * 0.5)])
    assert "loss " in (out / "report.txt").read_text()
    assert not (out / "checkpoints").exists()
    assert main(["report", str(out), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "report.html").is_file()
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["losses"] == summary["losses"]


def test_resume_after_a_crash_continues_bit_exactly(tmp_path, monkeypatch, capsys):
    steps = ["--steps", "6", "--warmup-steps", "2"]
    assert main([*TINY, *steps, "--out", str(tmp_path / "whole")]) == 0
    uninterrupted = _losses(tmp_path / "whole")

    real_batch = train_job.random_batch
    calls = []

    def crash_at_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(train_job, "random_batch", crash_at_step_5)
    run = tmp_path / "crashed"
    assert main([*TINY, *steps, "--out", str(run), "--save-every", "2"]) == 130   # Ctrl-C
    assert f"interrupted after step 4; `hetmem train --resume {run}` continues from its checkpoint " \
           f"step-00000004" in capsys.readouterr().err
    assert (run / "checkpoints" / "latest").read_text() == "step-00000004"
    monkeypatch.setattr(train_job, "random_batch", real_batch)
    monkeypatch.chdir(tmp_path)           # --resume without a folder: the newest run in hetmem_runs/
    (tmp_path / "hetmem_runs").mkdir()
    run.rename(tmp_path / "hetmem_runs" / "crashed")
    assert main(["train", "--resume", "--no-progress", "--sample", "0"]) == 0
    resumed = _losses(tmp_path / "hetmem_runs" / "crashed")
    assert resumed == uninterrupted  # exact: data position, weights, Adam state and lr schedule all resumed
    # the resumed run kept the run's --save-every 2
    assert (tmp_path / "hetmem_runs" / "crashed" / "checkpoints" / "latest").read_text() == "step-00000006"


def test_resume_without_a_checkpoint_is_one_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hetmem train: error: no run under hetmem_runs/ has a checkpoint to resume")
    assert err.count("\n") == 1


def test_train_bad_budget_is_one_clear_error(tmp_path, capsys):
    argv = ["train", "--d-model", "64", "--layers", "2", "--heads", "2", "--device", "cpu",
            "--device-budget", "1KiB", "--out", str(tmp_path), "--steps", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hetmem train: error: device_budget=1.00 KiB")
    assert "raise device_budget to at least" in err and "`hetmem profile`" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(ValueError, match="device_budget=1.00 KiB"):   # --log-level debug: the traceback
        main(["--log-level", "debug", *argv])


def test_a_budget_error_during_training_is_one_line(tmp_path, capsys):
    # (600KiB trains: activation offload moves what does not fit; 300KiB cannot hold even one
    # module's chunks next to the activations that must stay)
    assert main([*TINY, "--steps", "1", "--device-budget", "300KiB", "--no-checkpointing", "--batch-size", "8",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hetmem train: error: device budget exhausted") and err.count("\n") == 1
    assert "`hetmem profile`" in err


def test_unexpected_errors_keep_their_traceback(tmp_path, monkeypatch):
    def broken(options):
        raise RuntimeError("a bug")

    monkeypatch.setattr(train_job, "build", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main([*TINY, "--out", str(tmp_path)])


def test_ops_are_built_before_the_first_step(tmp_path, capsys, monkeypatch):
    order = []
    monkeypatch.setattr(OpBuilder, "needs_build", lambda self: True)
    monkeypatch.setattr(train_job, "load_ops", lambda options: order.append("ops") or [])
    real_build = train_job.build
    monkeypatch.setattr(train_job, "build", lambda options: order.append("engine") or real_build(options))
    assert main([*TINY, "--steps", "1", "--out", str(tmp_path)]) == 0
    assert order == ["ops", "engine"]
    out = capsys.readouterr().out
    assert "building C++ ops (cpu_adam; once, ~20 s)..." in out and "built in" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"hetmem {hetmem.__version__} (torch {__import__('torch').__version__})"


def test_profile_json(capsys):
    assert main(["profile", "--d-model", "64", "--layers", "2", "--heads", "2", "--block-size", "32",
                 "--batch-size", "2", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["min_device_budget"] < result["plain_total_bytes"]


def test_the_bar_starts_after_the_warm_up_step(tmp_path, monkeypatch):
    """The first step warms up (slower): the bar is created after it, at 1 of N, so its first
    ETA comes from steady steps (benchmarks/train_eta.py measures it against the real time)."""
    import tqdm

    created = []

    class Recording(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            created.append((kwargs["initial"], len(steps_done)))
            super().__init__(*args, **kwargs)

    steps_done = []
    real_train = train_job.train

    def counting_train(*args, **kwargs):
        for metrics in real_train(*args, **kwargs):
            steps_done.append(metrics.step)
            yield metrics

    monkeypatch.setattr(tqdm, "tqdm", Recording)
    monkeypatch.setattr(train_job, "train", counting_train)
    argv = [a for a in TINY if a != "--no-progress"]
    assert main([*argv, "--steps", "3", "--out", str(tmp_path)]) == 0
    assert created == [(1, 1)]   # one bar, made when step 1 was done, starting at 1


@pytest.mark.parametrize("flag,value", [("--nproc", "0"), ("--nproc", "-2"), ("--dist-timeout", "0"),
                                        ("--dist-timeout", "-1"), ("--dist-timeout", "nan"), ("--batch-size", "3")])
def test_bad_data_parallel_options_are_one_clear_error(tmp_path, capsys, monkeypatch, flag, value):
    # --nproc 0 used to train one process silently; a timeout <= 0 died in c10d's C++ stack trace
    # --batch-size 3 with --nproc 2: every rank printed it after the launch, then torchrun's traceback
    import hetmem.distributed.launch as launch

    monkeypatch.setattr(launch, "launch_ranks", lambda argv, nproc: pytest.fail("ranks launched"))
    nproc = ["--nproc", "2"] if flag != "--nproc" else []
    assert main([*TINY, "--steps", "1", "--out", str(tmp_path / "run"), *nproc, flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hetmem train: error: {flag} {value}") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_nproc_ranks_get_this_command_line_with_the_run_folder(tmp_path, monkeypatch):
    # `--resume` takes an optional value: `--resume --nproc 2` gave the ranks `2` as an argument
    # (its value was taken for --resume's); and the command line is main()'s, not sys.argv
    import hetmem.distributed.launch as launch

    monkeypatch.chdir(tmp_path)
    assert main([*TINY, "--steps", "1", "--save-every", "1", "--out", "hetmem_runs/run"]) == 0
    monkeypatch.setattr("sys.argv", ["pytest", "-q"])
    for tail in (["--resume", "--nproc", "2"], ["--nproc=2", "--resume"]):
        launched = []
        monkeypatch.setattr(launch, "launch_ranks", lambda argv, nproc: launched.append((argv, nproc)) or 0)
        assert main(["train", "--steps", "2", *tail]) == 0
        [(argv, nproc)] = launched
        assert nproc == 2 and argv[:-1] == ["train", "--steps", "2", "--resume"], tail
        assert (tmp_path / argv[-1]).resolve() == (tmp_path / "hetmem_runs" / "run").resolve()


def test_a_host_budget_too_small_for_the_nvme_pipeline_is_one_line_without_device_advice(tmp_path, capsys):
    argv = [*TINY, "--steps", "1", "--out", str(tmp_path / "run"), "--nvme-dir", str(tmp_path / "swap"),
            "--host-budget", "64KiB"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hetmem train: error: host_budget=64.00 KiB is too small for the NVMe pipeline")
    assert "raise host_budget to at least" in err and err.count("\n") == 1
    assert "hetmem profile" not in err  # it measures the device budget, which is not what is short here


def test_train_chunk_size_flag_sets_the_unit_and_bad_values_are_one_line(tmp_path, capsys):
    assert main([*TINY, "--steps", "1", "--out", str(tmp_path / "run"), "--chunk-size", "8192"]) == 0
    out = capsys.readouterr().out
    assert "groups of up to 8,192 parameters (each trimmed to the parameters it holds)" in out
    assert json.loads((tmp_path / "run" / "options.json").read_text())["extra"] == {"chunk_size": 8192}
    for bad in ("0", "1.5", "lots"):
        assert main([*TINY, "--steps", "1", "--out", str(tmp_path / bad), "--chunk-size", bad]) == 2
        err = capsys.readouterr().err
        assert err == (f"hetmem train: error: --chunk-size {bad!r} is not a chunk size: give parameters per chunk "
                       f"(an int > 0, e.g. 4194304), bytes of them (e.g. 64MiB) or auto\n")
        assert not (tmp_path / bad).exists()
