"""The grid on a real SLURM: scripts/slurm_local.sh brings up a single-node SLURM with accounting on this machine
(it needs root and Debian's slurm-wlm packages; .ci/run installs them), and the tiny grid goes through submitit's
SLURM executor as one job array, its jobs asking for the GPUs the partition has (none there). A job pre-empted by
SLURM's signal is requeued and resumes; a cancelled one shows as failed with SLURM's state. Where SLURM cannot
start, those tests are skipped with the reason. The GPU request's decision, from sinfo's answer, is tested on
sinfo's text alone."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness import grid as grids
from harness import launch
from tests.grid_support import ROOT, grid_command, same_records, task_records, wait_until, write_grid, write_shapes
from tests.test_grid import _paused_pid, grid_main

SCRIPT = ROOT / "scripts" / "slurm_local.sh"
SLURM_FLAGS = ["--launcher", "slurm", "--cpus-per-job", "1", "--timeout-min", "10"]   # GPUs: the partition's (none)

# sinfo -h -o '%P|%G' on a cluster with a default CPU partition, a GPU partition of two kinds of node and a partition
# whose nodes differ (GRES with a socket binding and a second resource)
SINFO = """cpu*|(null)
gpu|gpu:a100:4(S:0-1)
gpu|gpu:v100:2
mixed|(null)
mixed|gpu:1(S:0,1),mps:100
"""


def test_the_gpu_request_follows_what_the_partition_has():
    request = launch.slurm_gpu_request
    assert request(SINFO, None, None) == launch.SlurmGpus(0, "partition cpu has no GPUs: the jobs ask for none")
    assert request(SINFO, "cpu", 0).per_job == 0
    assert request(SINFO, "gpu", None) == launch.SlurmGpus(1, "partition gpu has 4 GPU(s) per node")
    assert request(SINFO, "gpu", 2).per_job == 2
    assert request(SINFO, "gpu", 0).per_job == 0
    assert request(SINFO, "mixed", None).per_job == 1
    assert request("debug*|(null)\n", None, None).per_job == 0                  # scripts/slurm_local.sh's cluster
    assert request("a|gpu:2\nb|(null)\n", None, None).per_job == 1             # no default: as before, 1
    assert request("a|gpu:2\nb|(null)\n", None, 3).per_job == 3


def test_gpus_of_a_partition_without_any_and_an_unknown_partition_are_refused_in_one_line():
    with pytest.raises(launch.LaunchError) as refused:
        launch.slurm_gpu_request(SINFO, None, 1)
    assert refused.value.one_line() == ("--gpus-per-job 1: partition cpu has no GPUs (sinfo's GRES: (null)); leave "
                                        "the flag out or name a partition with GPUs")
    with pytest.raises(launch.LaunchError, match="--gpus-per-job 2: partition debug has no GPUs"):
        launch.slurm_gpu_request("debug*|(null)\n", "debug", 2)
    with pytest.raises(launch.LaunchError) as refused:
        launch.slurm_gpu_request(SINFO, "gpus", None)
    assert refused.value.one_line() == ("--partition gpus: this cluster has no such partition; its partitions (sinfo): "
                                        "cpu, gpu, mixed")


def test_without_sinfo_the_request_is_the_flag_or_one_gpu_unchecked(monkeypatch):
    monkeypatch.setattr(launch.shutil, "which", lambda name: None)
    assert launch.slurm_gpus(launch.LaunchOptions("slurm", partition="anything")).per_job == 1
    assert launch.slurm_gpus(launch.LaunchOptions("slurm", gpus_per_job=0)).per_job == 0


@pytest.fixture(scope="module")
def slurm():
    if not sys.platform.startswith("linux"):
        pytest.skip(f"SLURM test skipped: scripts/slurm_local.sh runs on Linux, not {sys.platform}")
    was_up = subprocess.run(["scontrol", "ping"], capture_output=True, text=True).returncode == 0 \
        if subprocess.run(["which", "scontrol"], capture_output=True).returncode == 0 else False
    started = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=180)
    if started.returncode != 0:
        reason = (started.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"SLURM test skipped: `bash scripts/slurm_local.sh start` exited {started.returncode}: {reason}")
    yield
    if not was_up:
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("shapes") / "data")


def _statuses(grid):
    return {s.job.id: s for s in grids.job_statuses(grid, launch.scheduler_states(grid))}


def _slurm_id(grid, job) -> str:
    return launch.read_submissions(grid)[job.id]["scheduler_id"]


def test_the_tiny_grid_on_slurm_preempted_job_requeued_cancelled_job_failed(slurm, tmp_path, shapes):
    # the reference: the same grid, uninterrupted, in this process
    reference = tmp_path / "reference"
    ref_grid = write_grid(reference, pausable=True)
    assert grid_main("run", ref_grid, "--launcher", "debug", "DATA_DIR", shapes, "SAVE_DIR", reference / "out") == 0

    # 1. one job array; one job waits inside a batch, SLURM signals it (as before a time limit or a pre-emption):
    #    submitit requeues it, it resumes, and the grid's records are the uninterrupted ones
    folder = tmp_path / "preempted"
    path = write_grid(folder, pausable=True)
    opts = ["DATA_DIR", shapes, "SAVE_DIR", folder / "out"]
    (folder / "PAUSE").touch()
    result = grid_command("run", path, *SLURM_FLAGS, "--no-wait", *opts)
    assert result.returncode == 0, result.stdout + result.stderr
    grid = grids.load_grid(path, opts)
    array = {_slurm_id(grid, job).split("_")[0] for job in grid.jobs}
    assert len(array) == 1                                     # one submission: a job array
    pid = wait_until(lambda: _paused_pid(folder), 120, "a job to pause inside a batch")
    # the paused job is the running one whose process wrote PAUSED (a job just finishing may still show as running)
    paused = wait_until(lambda: next((s for s in _statuses(grid).values() if s.state == "running"
                                      and (grids.read_state(grid.folder, s.job) or {}).get("pid") == pid
                                      and grids.lock_held(grid.folder, s.job)), None), 60, "the paused job")
    signal = subprocess.run(["scancel", "--signal=USR2", _slurm_id(grid, paused.job)], capture_output=True, text=True)
    assert signal.returncode == 0, signal.stderr
    wait_until(lambda: all(s.state == "done" for s in _statuses(grid).values()), 240, "every job done after requeue")
    log = (grid.folder / "submitit").glob(f"{_slurm_id(grid, paused.job)}_0_log.out")
    text = "".join(p.read_text() for p in log)
    # (submitit calls any signal in the last 10 min of a job's time "timed-out"; requeued all the same)
    assert "Caught signal SIGUSR2" in text and "Requeued job" in text
    assert same_records(task_records(folder / "out"), task_records(reference / "out"))
    result = grid_command("run", path, *SLURM_FLAGS, *opts)
    assert result.returncode == 0 and "0 of 4 jobs to submit (4 done, 0 running)" in result.stdout
    table = (grid.folder / "tables" / "shapes_c.md").read_text()
    assert "| source |" in table and "| pausable_tent |" in table

    # 2. a job cancelled while it runs (no requeue): failed, with SLURM's word for it, the others finish
    folder = tmp_path / "cancelled"
    path = write_grid(folder, pausable=True)
    opts = ["DATA_DIR", shapes, "SAVE_DIR", folder / "out"]
    (folder / "PAUSE").touch()
    assert grid_command("run", path, *SLURM_FLAGS, "--no-wait", *opts).returncode == 0
    grid = grids.load_grid(path, opts)
    wait_until(lambda: _paused_pid(folder), 120, "a job to pause inside a batch")
    wait_until(lambda: [s.state for s in _statuses(grid).values()].count("done") == 3, 120, "the other jobs done")
    victim = next(s for s in _statuses(grid).values() if s.state != "done")
    assert subprocess.run(["scancel", _slurm_id(grid, victim.job)]).returncode == 0
    status = wait_until(lambda: (lambda s: s if s.state == "failed" else None)(_statuses(grid)[victim.job.id]), 120,
                        "the cancelled job to show as failed")
    assert "CANCELLED" in status.detail and "log.txt" in status.log
    result = grid_command("status", path, *opts)
    assert result.returncode == 1 and f"failed   {victim.job.id}" in result.stdout
    (folder / "PAUSE").unlink()
    result = grid_command("run", path, *SLURM_FLAGS, "--retry-failed", *opts)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 of 4 jobs to submit" in result.stdout
    assert same_records(task_records(folder / "out"), task_records(reference / "out"))
    submissions = [json.loads(line) for line in (grid.folder / "submissions.jsonl").read_text().splitlines()]
    assert [s["job"] for s in submissions].count(victim.job.id) == 2


def test_a_partition_or_gpus_the_cluster_lacks_are_refused_before_anything_is_submitted(slurm, tmp_path, capsys):
    path = write_grid(tmp_path)
    opts = ["DATA_DIR", tmp_path / "no_data", "SAVE_DIR", tmp_path / "out"]
    assert grid_main("run", path, "--launcher", "slurm", "--gpus-per-job", "1", *opts) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        "error: --gpus-per-job 1: partition debug has no GPUs (sinfo's GRES: (null))")
    assert grid_main("run", path, "--launcher", "slurm", "--partition", "gpu", *opts) == 2
    assert capsys.readouterr().err.splitlines()[-1] == ("error: --partition gpu: this cluster has no such partition; "
                                                       "its partitions (sinfo): debug")
    assert not (tmp_path / "out").exists()
