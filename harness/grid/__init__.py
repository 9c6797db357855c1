"""A grid of runs: data sets x configs x seeds x settings, with overrides for every cell and for some cells,
expanded into jobs; what state each job is in; the comparison tables of its results.

- spec.py: the grid file (its format is there), read, checked and expanded into cells and jobs;
- jobs.py: a job's state file and lock, what its run folder has finished, running one job where it runs;
- status.py: each job's state (done, running, failed, pending), in the grid's words for what a scheduler says;
- tables.py: the grid's comparison tables and the compute its jobs used.

Launching the jobs (submitit, SLURM's words) is harness/launch.py, which imports this package, never the other
way round: status and report need neither submitit's executors nor torch."""
from harness.grid.jobs import (check_inputs, claim, finished_tasks, lock_held, lock_path, read_state, run_job,
                               state_path, write_state)
from harness.grid.spec import (AXES, GRID_KEYS, MANAGED, SPLITS, WHERE_KEYS, Cell, Grid, GridError, GridJob,
                               claim_folder, load_grid, read_grid_file, split_by_domain)
from harness.grid.status import JOB_STATES, JobStatus, QueueState, SchedulerState, job_statuses
from harness.grid.tables import cell_payload, compute_summary, grid_row_groups, grid_tables

__all__ = ["AXES", "GRID_KEYS", "JOB_STATES", "MANAGED", "SPLITS", "WHERE_KEYS", "Cell", "Grid", "GridError",
           "GridJob", "JobStatus", "QueueState", "SchedulerState", "cell_payload", "check_inputs", "claim",
           "claim_folder", "compute_summary", "finished_tasks", "grid_row_groups", "grid_tables", "job_statuses",
           "load_grid", "lock_held", "lock_path",
           "read_grid_file", "read_state", "run_job", "split_by_domain", "state_path", "write_state"]
