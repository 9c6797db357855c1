"""Grids: the grid file's expansion into jobs and their identity; refusals of bad grid files; run / status /
report through scripts/grid.py in this process (debug launcher) and in worker processes (local launcher), with a
job killed by SIGKILL and a job pre-empted (submitit's signal, requeued) that both end with the records of an
uninterrupted run. The real-SLURM run is tests/test_slurm.py."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from harness import grid as grids
from harness import launch
from harness.build import load_cfg
from harness.identity import config_hash
from harness.report import paper
from harness.settings import build_tasks
from tests.grid_support import (DOMAINS, ROOT, grid_command, same_records, task_records, wait_until, write_grid,
                                write_shapes)
from tests.synthetic import without_cost

SCRIPT_MAIN = None


def grid_main(*args) -> int:
    """scripts/grid.py's main in this process."""
    global SCRIPT_MAIN
    if SCRIPT_MAIN is None:
        import importlib.util
        spec = importlib.util.spec_from_file_location("grid_script", ROOT / "scripts" / "grid.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        SCRIPT_MAIN = module.main
    return SCRIPT_MAIN([str(a) for a in args])


# ------------------------------------------------------------------------------------------------ expansion

def test_tiny_grid_is_a_job_per_method_and_corruption_with_the_configs_of_test_time(tmp_path):
    grid = grids.load_grid(write_grid(tmp_path), ["SAVE_DIR", str(tmp_path / "out")])
    assert [(j.config_name, j.domains) for j in grid.jobs] == [(m, (d,)) for m in ("source", "tent") for d in DOMAINS]
    for job in grid.jobs:
        # the config test_time.py would run with the same overrides: same hash, same run folder
        opts = ["CORRUPTION.TYPE", str(DOMAINS), "CORRUPTION.NUM_EX", "16", "TEST.BATCH_SIZE", "8",
                "TEST.NUM_WORKERS", "0", "DEVICE", "cpu", "SAVE_DIR", str(tmp_path / "out"), "RNG_SEED", "1",
                "SETTING", "reset_each_shift"]
        cfg = load_cfg(f"conf/shapes_c/{job.config_name}.yaml", opts)
        assert job.config_hash == config_hash(cfg) and job.config_hash in job.id and job.domains[0] in job.id
        tasks = build_tasks(cfg)
        assert [tasks[i].segments[0].domain for i in job.tasks] == list(job.domains)
        assert job.config().cfg.RUN_DOMAINS == list(job.domains)
    assert grid.folder == tmp_path / "out" / "grids" / "tiny_test"


def test_job_identity_is_stable_and_moves_only_with_what_changes_results(tmp_path):
    path = write_grid(tmp_path)
    first = [j.id for j in grids.load_grid(path).jobs]
    assert first == [j.id for j in grids.load_grid(path).jobs]
    # where data and results live is not part of a job's identity
    assert first == [j.id for j in grids.load_grid(path, ["DATA_DIR", "/elsewhere", "SAVE_DIR", "/x"]).jobs]
    # a cell override changes the identity of the cells it matches only
    other = write_grid(tmp_path / "b", extra="cells:\n  - where: {method: tent}\n    overrides: {OPTIM.LR: 0.5}\n")
    changed = grids.load_grid(other)
    assert [j.id for j in changed.jobs][:2] == first[:2] and not set([j.id for j in changed.jobs][2:]) & set(first)
    assert all(j.config().cfg.OPTIM.LR == 0.5 for j in changed.jobs if j.config_name == "tent")


@pytest.mark.parametrize("setting,severities,jobs_per_cell", [
    ("reset_each_shift", [5], 2),          # a job per corruption
    ("reset_each_shift", [5, 3], 2),       # severities of one corruption share its adaptation: one job, 2 tasks
    ("continual", [5], 1),                 # the state flows from corruption to corruption: one job
    ("mixed_domains", [5], 1),
])
def test_settings_split_into_jobs_only_where_domains_are_independent(tmp_path, setting, severities, jobs_per_cell):
    path = write_grid(tmp_path)
    path.write_text(path.read_text().replace("settings: [reset_each_shift]", f"settings: [{setting}]"))
    grid = grids.load_grid(path, ["CORRUPTION.SEVERITY", str(severities), "CORRUPTION.SUBSET", "first_n"])
    cell = grid.cells[0]
    assert len(cell.jobs) == jobs_per_cell
    assert sorted(i for job in cell.jobs for i in job.tasks) == list(range(len(cell.tasks)))
    if jobs_per_cell == 1:
        assert cell.jobs[0].domains == ()


def _conf_domains(dataset: str) -> int:
    return len(yaml.safe_load((ROOT / "conf" / "datasets" / f"{dataset}.yaml").read_text())["CORRUPTION"]["TYPE"])


def test_the_paper_grids_cover_every_row_of_the_papers_tables():
    main = grids.load_grid(ROOT / "grids" / "paper_main.yaml")
    expected = 0
    for dataset in ("cifar10_c", "cifar100_c", "imagenet_c"):
        cells = [c for c in main.cells if c.dataset == dataset]
        assert {c.config_name for c in cells} == set(paper.paper_methods(dataset)), dataset
        expected += len(paper.paper_methods(dataset)) * _conf_domains(dataset)
        assert all(len(c.jobs) == _conf_domains(dataset) for c in cells)
        # each cell runs its shipped config's own setting (StatA's stream is label-correlated)
        for cell in cells:
            assert cell.setting == load_cfg(f"conf/{dataset}/{cell.config_name}.yaml").SETTING
    assert len(main.jobs) == expected == 450
    # a cell's config name is the grid's label for it; its method is the registered one it runs
    gamma = next(c for c in main.cells if c.config_name == "stata_gamma_m1")
    assert gamma.method == "stata" and grids.cell_payload(main, gamma)["method"] == "stata"
    dg = grids.load_grid(ROOT / "grids" / "paper_dg.yaml")
    for dataset in ("pacs", "vlcs", "office_home", "terra_incognita"):
        shipped = {c.config_name for c in dg.cells if c.dataset == dataset}
        assert shipped == set(paper.paper_methods(dataset)) - {"watt_p", "watt_s"}, dataset
    assert len(dg.jobs) == sum(3 * _conf_domains(d) for d in ("pacs", "vlcs", "office_home", "terra_incognita"))
    tiny = grids.load_grid(ROOT / "grids" / "tiny.yaml")
    assert len(tiny.jobs) == 4


BAD_GRIDS = [
    ("colour: red\n", "unknown key 'colour'"),
    ("overrides: {RNG_SEED: 3}\n", "RNG_SEED is an axis of the grid; list its values under 'seeds'"),
    ("overrides: {RESUME: False}\n", "RESUME is set by the grid"),
    ("overrides: {MODEL: {ADAPTATION: tent}}\n", "MODEL.ADAPTATION is an axis of the grid"),
    ("cells:\n  - where: {method: batclip}\n    overrides: {OPTIM.LR: 0.1}\n", "cells[0].where matches no cell"),
    ("cells:\n  - where: {metod: tent}\n    overrides: {OPTIM.LR: 0.1}\n", "unknown key 'metod'"),
    ("exclude: [{dataset: cifar10_c}]\n", "exclude[0] matches no cell"),
    ("exclude: [{method: [source, tent]}]\n", "every cell is excluded"),
    ("cells:\n  - where: {method: tent}\n    overrides: {TEST.BATCH_SIZE: -1}\n", "cell (tent, shapes_c, seed 1): "),
    ("cells:\n  - where: {method: tent}\n    overrides: {OPTIM.LR: 0.1}\n    extra: 1\n", "expected 'where'"),
    ("split: corruption\n", "'split' is one of domain, cell (a job per domain, or per cell); got 'corruption'"),
]


@pytest.mark.parametrize("extra,message", BAD_GRIDS)
def test_bad_grid_files_are_refused_with_the_place_and_the_reason(tmp_path, extra, message):
    with pytest.raises(grids.GridError, match=None) as err:
        grids.load_grid(write_grid(tmp_path, extra=extra))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_more_refusals(tmp_path):
    path = write_grid(tmp_path)
    for edit, message in [(("[source, tent]", "[source, batclip, mta]"), "no shipped config for method 'mta'"),
                          (("seeds: [1]", "seeds: [1, 1]"), "'seeds' lists a seed twice"),
                          (("seeds: [1]", "seeds: [one]"), "'seeds' must be a non-empty list of integers"),
                          (("[shapes_c]", "[]"), "'datasets' must be a non-empty list")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(path.read_text().replace(*edit))
        with pytest.raises(grids.GridError, match=message):
            grids.load_grid(bad)
    with pytest.raises(grids.GridError, match="RUN_NAME is set by the grid"):
        grids.load_grid(path, ["RUN_NAME", "mine"])
    # two cells that are one config
    tent_file = tmp_path / "my_tent.yaml"
    tent_file.write_text(load_cfg("conf/shapes_c/tent.yaml").dump())
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("[source, tent]", f"[tent, {tent_file}]"))
    with pytest.raises(grids.GridError, match="are the same config"):
        grids.load_grid(bad)
    # a config file for another data set than the one it is listed under
    other = tmp_path / "cifar_tent.yaml"
    other.write_text(load_cfg("conf/cifar10_c/tent.yaml").dump())
    bad.write_text(path.read_text().replace("[source, tent]", f"[source, {other}]"))
    with pytest.raises(grids.GridError, match="is a config for cifar10_c, listed here under shapes_c"):
        grids.load_grid(bad)


def test_a_job_runs_the_config_it_was_expanded_with_and_refuses_one_that_hashes_otherwise(tmp_path):
    tent_file = tmp_path / "my_tent.yaml"
    tent_file.write_text(load_cfg("conf/shapes_c/tent.yaml").dump())
    path = write_grid(tmp_path)
    path.write_text(path.read_text().replace("[source, tent]", f"[{tent_file}]"))
    job = grids.load_grid(path).jobs[0]
    tent_file.write_text(tent_file.read_text().replace("LR: 0.001", "LR: 0.002"))
    # the job carries its expanded config: an edit to the file since does not reach it
    assert job.config().cfg.OPTIM.LR == 0.001 and config_hash(job.config().cfg) == job.config_hash
    # a config that no longer hashes as at the expansion (the suite's defaults changed, say) is refused in a line
    moved = dataclasses.replace(job, config_text=job.config_text.replace("LR: 0.001", "LR: 0.002"))
    with pytest.raises(grids.GridError) as refused:
        moved.config()
    assert "when the grid was expanded" in str(refused.value) and "\n" not in str(refused.value)


def test_the_command_line_refuses_in_one_line(tmp_path, capsys):
    path = write_grid(tmp_path)
    assert grid_main("status", path, "RNG_SEED", "2") == 2
    assert capsys.readouterr().err.strip() == ("error: the command line: RNG_SEED is an axis of the grid; list its "
                                               "values under 'seeds' instead")
    with pytest.raises(SystemExit):
        grid_main("status", path, "--parallel", "2")
    assert "--parallel is a flag of 'run', not of 'status'" in capsys.readouterr().err
    assert grid_main("run", path, "--launcher", "debug", "--parallel", "2") == 2
    assert "--parallel is for --launcher local" in capsys.readouterr().err
    assert grid_main("run", path, "--launcher", "local", "--setup", "module load cuda") == 2
    assert capsys.readouterr().err.strip() == "error: --setup is for --launcher slurm, not local"
    assert grid_main("run", path, "--launcher", "debug", "--slurm-param", "qos=high") == 2
    assert capsys.readouterr().err.strip() == "error: --slurm-param is for --launcher slurm, not debug"
    assert grid_main("status", tmp_path / "missing.yaml") == 2
    assert "grid file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ run, status, report

@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("shapes") / "data")


def statuses(grid):
    return {s.job.id: s for s in grids.job_statuses(grid, launch.scheduler_states(grid))}


def test_debug_run_finishes_every_job_and_reports_the_tables_a_rerun_submits_nothing(tmp_path, shapes, capsys):
    opts = ["DATA_DIR", shapes, "SAVE_DIR", tmp_path / "out"]
    path = write_grid(tmp_path)
    assert grid_main("report", path, *opts) == 0          # before any run: every cell shown as missing
    before = capsys.readouterr().out
    assert "| source | - | - | - |" in before and "not run yet" in before
    threads = torch.get_num_threads()
    assert grid_main("run", path, "--launcher", "debug", "--cpus-per-job", "2", *opts) == 0
    # the in-process jobs ran on their 2 threads and gave the calling process its own count back
    assert torch.get_num_threads() == threads == 1
    out = capsys.readouterr().out
    assert "4 of 4 jobs to submit" in out and "tiny_test: 4 done, 0 running, 0 failed, 0 pending of 4 jobs" in out
    grid = grids.load_grid(path, opts)
    assert {s.state for s in statuses(grid).values()} == {"done"}
    # the grid's records are those of test_time.py's runs of the same configs, one process per config
    from harness.run import evaluate
    for method in ("source", "tent"):
        job = next(j for j in grid.jobs if j.config_name == method)
        cfg = load_cfg(job.config_file, list(job.opts) + ["SAVE_DIR", str(tmp_path / "direct")])
        direct = evaluate(cfg, progress=False)
        stored = json.loads((Path(job.run_dir) / "results.json").read_text())
        assert same_records(without_cost(stored["records"]), without_cost(direct["records"])) and stored["complete"]
        assert stored["provenance"]["torch_threads"] == 2
        # the table's cells are the results' accuracies
        with open(grid.folder / "tables" / "shapes_c.csv", newline="") as f:
            row = next(r for r in csv.DictReader(f) if r["row"] == method)
        assert [100 * r["accuracy"] for r in direct["records"]] == pytest.approx([float(row[d]) for d in DOMAINS])
    assert sorted(p.suffix for p in (grid.folder / "tables").iterdir()) == [".csv", ".md", ".png", ".tex"]
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("tasks/task_*.json")}
    assert grid_main("run", path, "--launcher", "debug", *opts) == 0
    assert "0 of 4 jobs to submit (4 done, 0 running)" in capsys.readouterr().out
    assert mtimes == {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("tasks/task_*.json")}
    # a record removed: that job only is pending again, and a rerun computes it alone
    victim = next(j for j in grid.jobs if j.config_name == "tent" and j.domains == ("fog",))
    Path(victim.run_dir, "tasks", f"task_{victim.tasks[0]:04d}.json").unlink()
    assert [s.state for s in statuses(grid).values()].count("pending") == 1
    assert statuses(grid)[victim.id].state == "pending"
    assert grid_main("run", path, "--launcher", "debug", *opts) == 0
    assert "1 of 4 jobs to submit" in capsys.readouterr().out


def test_split_cell_runs_a_cell_as_one_job_into_the_same_run_folders(tmp_path, shapes, capsys):
    opts = ["DATA_DIR", shapes, "SAVE_DIR", tmp_path / "out"]
    whole = write_grid(tmp_path / "whole", extra="split: cell\n")
    grid = grids.load_grid(whole, opts)
    assert [(j.config_name, j.domains, j.tasks) for j in grid.jobs] == [("source", (), (0, 1)), ("tent", (), (0, 1))]
    assert grid_main("run", whole, "--launcher", "debug", *opts) == 0
    assert "2 of 2 jobs to submit" in capsys.readouterr().out
    # the per-domain grid of the same cells finds every one of its jobs done in those run folders
    per_domain = grids.load_grid(write_grid(tmp_path / "per_domain"), opts)
    assert {j.run_dir for j in per_domain.jobs} == {j.run_dir for j in grid.jobs}
    assert [s.state for s in statuses(per_domain).values()] == ["done"] * 4


def test_a_failing_job_blocks_nothing_and_retry_failed_reruns_only_it(tmp_path, shapes, capsys):
    empty = tmp_path / "not_yet"
    empty.mkdir()
    extra = f"cells:\n  - where: {{method: tent}}\n    overrides: {{DATA_DIR: {empty}}}\n"
    path = write_grid(tmp_path, extra=extra)
    opts = ["SAVE_DIR", tmp_path / "out"]
    path.write_text(path.read_text().replace("overrides:\n", f"overrides:\n  DATA_DIR: {shapes}\n", 1))
    assert grid_main("run", path, "--launcher", "debug", *opts) == 1
    captured = capsys.readouterr()
    grid = grids.load_grid(path, opts)
    states = statuses(grid)
    failed = [s for s in states.values() if s.state == "failed"]
    assert sorted(s.job.config_name for s in failed) == ["tent", "tent"]
    assert [s.state for s in states.values()].count("done") == 2
    for s in failed:
        assert str(empty) in s.detail and "\n" not in s.detail and "log.txt" in s.log
        assert f"failed   {s.job.id}" in captured.out
    assert "--retry-failed" in captured.err
    # the table: source complete, tent's cells missing and no mean
    table = (grid.folder / "tables" / "shapes_c.md").read_text()
    tent_row = next(line for line in table.splitlines() if line.startswith("| tent |"))
    assert tent_row.replace(" ", "") == "|tent|-|-|-|"
    # a pending job is not a failed one: --retry-failed leaves it alone
    write_shapes(empty)
    assert grid_main("run", path, "--launcher", "debug", "--retry-failed", *opts) == 0
    assert "2 of 4 jobs to submit (2 done, 0 running, pending ones left alone)" in capsys.readouterr().out
    assert {s.state for s in statuses(grid).values()} == {"done"}


def test_statuses_tell_running_killed_and_queued_jobs(tmp_path):
    grid = grids.load_grid(write_grid(tmp_path), ["SAVE_DIR", tmp_path / "out"])
    job = grid.jobs[0]
    with grids.claim(grid.folder, job) as mine:
        assert mine
        grids.write_state(grid.folder, job, state="running")
        assert statuses(grid)[job.id].state == "running"
        with grids.claim(grid.folder, job) as second:       # another process's claim of a held job
            assert second is False
    # the lock is gone and the job recorded no end: killed
    status = statuses(grid)[job.id]
    assert status.state == "failed" and "stopped without recording an end" in status.detail
    # a SLURM job in the queue is pending; one the scheduler ended without a record is failed with its state
    submission = {job.id: {"launcher": "slurm", "scheduler_id": "12_0", "folder": "x"}}
    other = grid.jobs[1]
    submission[other.id] = {"launcher": "slurm", "scheduler_id": "12_1", "folder": "x"}
    words = {"12_0": "RUNNING", "12_1": "PENDING"}
    found = {s.job.id: s for s in grids.job_statuses(grid, {j: launch.slurm_state(s, words[s["scheduler_id"]])
                                                             for j, s in submission.items()})}
    assert found[job.id].state == "running" and found[other.id].state == "pending"
    assert "queued as slurm job 12_1" in found[other.id].detail
    words = {"12_0": "TIMEOUT", "12_1": "CANCELLED"}
    found = {s.job.id: s for s in grids.job_statuses(grid, {j: launch.slurm_state(s, words[s["scheduler_id"]])
                                                             for j, s in submission.items()})}
    assert found[job.id].state == "failed" and "slurm job 12_0 ended (TIMEOUT)" in found[job.id].detail
    assert found[other.id].state == "failed" and "(CANCELLED) before it started" in found[other.id].detail
    # SLURM's words are the launcher's: the grid sees active / queued / ended, and nothing where sacct knows no job
    assert [launch.slurm_state(submission[job.id], w).state for w in ("COMPLETING", "REQUEUE_HOLD", "FAILED")] == [
        grids.QueueState.ACTIVE, grids.QueueState.QUEUED, grids.QueueState.ENDED]
    assert launch.slurm_state(submission[job.id], "UNKNOWN") is None


# ------------------------------------------------------------------------------------------------ real processes

@pytest.fixture(scope="module")
def reference_records(tmp_path_factory, shapes):
    """The pausable grid's records from an uninterrupted run (debug launcher, this process)."""
    folder = tmp_path_factory.mktemp("reference")
    path = write_grid(folder, pausable=True)
    assert grid_main("run", path, "--launcher", "debug", "DATA_DIR", shapes, "SAVE_DIR", folder / "out") == 0
    records = task_records(folder / "out")
    assert len(records) == 4
    return records


def _paused_pid(folder: Path) -> int:
    paused = folder / "PAUSED"
    return int(paused.read_text()) if paused.is_file() and paused.read_text() else 0


def test_local_workers_a_job_killed_by_sigkill_loses_nothing_else_and_a_rerun_completes_it(
        tmp_path, shapes, reference_records):
    path = write_grid(tmp_path, pausable=True)
    opts = ["DATA_DIR", shapes, "SAVE_DIR", tmp_path / "out"]
    (tmp_path / "PAUSE").touch()
    result = grid_command("run", path, "--launcher", "local", "--parallel", "2", "--cpus-per-job", "1", "--no-wait",
                          *opts)
    assert result.returncode == 0, result.stderr
    assert "submitted 4 jobs with --launcher local" in result.stdout
    grid = grids.load_grid(path, opts)
    # the other worker finishes the three other jobs while one waits inside a batch of TENT
    wait_until(lambda: [s.state for s in statuses(grid).values()].count("done") == 3, 120, "three jobs done")
    pid = wait_until(lambda: _paused_pid(tmp_path), 60, "the paused job's pid")
    paused = next(s for s in statuses(grid).values() if s.state != "done")
    assert paused.state == "running"
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: statuses(grid)[paused.job.id].state == "failed", 30, "the killed job to show as failed")
    assert "stopped without recording an end" in statuses(grid)[paused.job.id].detail
    (tmp_path / "PAUSE").unlink()
    result = grid_command("run", path, "--launcher", "local", "--parallel", "2", "--cpus-per-job", "1", *opts)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 of 4 jobs to submit (3 done, 0 running)" in result.stdout
    assert same_records(task_records(tmp_path / "out"), reference_records)


def test_a_preempted_local_worker_is_requeued_by_submitit_and_resumes(tmp_path, shapes, reference_records):
    path = write_grid(tmp_path, pausable=True)
    opts = ["DATA_DIR", str(shapes), "SAVE_DIR", str(tmp_path / "out"), "TEST.NUM_WORKERS", "0"]
    grid = grids.load_grid(path, opts)
    (tmp_path / "PAUSE").touch()
    options = launch.LaunchOptions("local", parallel=1, cpus_per_job=1)
    os.environ["PYTHONPATH"] = str(ROOT)
    handles = launch.submit(grid, grid.jobs, options)
    pid = wait_until(lambda: _paused_pid(tmp_path), 120, "the paused job's pid")
    paused = next(s for s in statuses(grid).values() if s.state == "running")
    os.kill(pid, signal.SIGUSR2)        # what SLURM sends a job before its time limit or a pre-emption
    wait_until(lambda: grids.read_state(grid.folder, paused.job).get("state") == "interrupted", 30,
               "the job to record its interruption")
    launch.wait(handles, poll_s=0.5)     # the requeued attempt does not pause again (PAUSED exists)
    assert {s.state for s in statuses(grid).values()} == {"done"}
    log = Path(grids.read_state(grid.folder, paused.job)["output"]).read_text()
    assert "this job is preempted" in log and "Requeued job" in log
    assert same_records(task_records(tmp_path / "out"), reference_records)
    # the first attempt's unfinished task was not written; nothing is counted twice
    results = json.loads((Path(paused.job.run_dir) / "results.json").read_text())
    assert sum(r["n"] for r in results["records"]) == 2 * 16 and len(results["records"]) == 2


# ------------------------------------------------------------------------------------------------ nothing silent (26)

def test_another_data_dir_is_neither_done_nor_tabled_nor_run_over(tmp_path, shapes, capsys):
    """The records of a grid's run folders are checked as a run checks them before it resumes (their data, input
    files, weights): another DATA_DIR (here an identical copy elsewhere) is not "done" and its numbers not tabled."""
    import shutil
    opts = ["SAVE_DIR", tmp_path / "out"]
    path = write_grid(tmp_path)
    assert grid_main("run", path, "--launcher", "debug", "DATA_DIR", shapes, *opts) == 0
    copy = tmp_path / "copy"
    shutil.copytree(shapes, copy)
    capsys.readouterr()
    assert grid_main("status", path, "DATA_DIR", copy, *opts) == 1
    out = capsys.readouterr().out
    assert out.count("failed ") == 4 and f"computed on other data (DATA_DIR {Path(shapes).resolve()} then, " \
                                        f"{copy.resolve()} now)" in out
    assert grid_main("report", path, "DATA_DIR", copy, *opts) == 2
    assert "computed on other data" in capsys.readouterr().err
    assert grid_main("run", path, "--launcher", "debug", "DATA_DIR", copy, *opts) == 2
    err = capsys.readouterr().err
    assert "4 job(s) cannot resume the records in their run folders" in err and "submitted" not in err
    # a file that cannot be read here is compared by its folder: still refused
    grid = grids.load_grid(path, ["DATA_DIR", tmp_path / "nowhere", *opts])
    assert all("computed on other data" in s.detail for s in grids.job_statuses(grid))


def test_a_cut_results_file_is_named_and_a_pending_job_is_said_with_its_command(tmp_path, shapes, capsys):
    opts = ["DATA_DIR", shapes, "SAVE_DIR", tmp_path / "out"]
    path = write_grid(tmp_path)
    # --retry-failed submits nothing here (every job is pending): the command says so and how to run them
    assert grid_main("run", path, "--launcher", "debug", "--retry-failed", *opts) == 1
    err = capsys.readouterr().err
    assert "4 job(s) still pending, and no worker runs them" in err and f"run them with python scripts/grid.py " \
                                                                        f"run {path}" in err
    assert grid_main("run", path, "--launcher", "debug", *opts) == 0
    grid = grids.load_grid(path, opts)
    results = Path(grid.cells[0].jobs[0].run_dir) / "results.json"
    results.write_text(results.read_text()[:40])
    capsys.readouterr()
    assert grid_main("status", path, *opts) == 0
    out = capsys.readouterr().out
    assert out.count(f"{results} cannot be read (cut short?); running the job again rewrites it") == 2
    assert grid_main("run", path, "--launcher", "debug", *opts) == 0
    assert json.loads(results.read_text())["complete"]


def test_a_second_grid_of_the_same_name_is_refused_and_an_edited_one_is_not(tmp_path, shapes, capsys):
    opts = ["DATA_DIR", shapes, "SAVE_DIR", tmp_path / "out"]
    first = write_grid(tmp_path / "first")
    assert grid_main("report", first, *opts) == 0
    other = write_grid(tmp_path / "other", extra="exclude: [{method: tent}]\n")
    with pytest.raises(grids.GridError, match=f"grid name 'tiny_test' is taken in .* by the grid file {first}"):
        grids.load_grid(other, opts)
    # the same file edited, or an identical copy elsewhere, is the same grid
    copy = tmp_path / "copy" / "tiny_test.yaml"
    copy.parent.mkdir()
    copy.write_text(first.read_text())
    grids.load_grid(copy, opts)
    first.write_text(first.read_text() + "exclude: [{method: tent}]\n")
    assert [c.config_name for c in grids.load_grid(first, opts).cells] == ["source"]


def test_a_method_alias_and_a_shipped_config_path_from_any_folder(tmp_path, monkeypatch):
    path = write_grid(tmp_path)
    path.write_text(path.read_text().replace("methods: [source, tent]", "methods: [zs, conf/shapes_c/tent.yaml]"))
    monkeypatch.chdir(tmp_path)
    grid = grids.load_grid(path, ["SAVE_DIR", tmp_path / "out"])
    assert [(c.config_name, c.method) for c in grid.cells] == [("zs", "source"), ("tent", "tent")]
    reference = grids.load_grid(write_grid(tmp_path / "ref"), ["SAVE_DIR", tmp_path / "out"])
    assert [j.config_hash for j in grid.jobs] == [j.config_hash for j in reference.jobs]


def test_a_plugin_file_edited_after_the_run_is_not_done_for_the_grid(tmp_path, shapes, capsys):
    """The content of the files a cell reads (here its plug-in) is part of what status checks, as a run does."""
    path = write_grid(tmp_path, pausable=True)
    opts = ["DATA_DIR", shapes, "SAVE_DIR", tmp_path / "out"]
    assert grid_main("run", path, "--launcher", "debug", *opts) == 0
    plugin = tmp_path / "pausable_tent.py"
    plugin.write_text(plugin.read_text() + "# edited\n")
    # in a process of its own: this one has imported the plug-in as it was (another content of one plug-in name
    # in one process is refused)
    status = grid_command("status", path, *opts)
    assert status.returncode == 1, status.stderr
    out = status.stdout
    assert out.count("computed with another MODEL.EXTRA_MODULES pausable_tent.py") == 2     # TENT's two jobs
    assert out.count("done     ") == 2                                                       # source's
