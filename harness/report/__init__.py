"""Reporting: side-by-side comparison of results, apart from running them. Reading results.json files, pooling
seeds, merging shards (runs), the table model (model), building tables with the BATCLIP paper's rows beside the
measured ones (table, paper), and writing them as Markdown, CSV, LaTeX and a PNG figure (writers) or as one
self-contained HTML results page with every metric's table and each cell's provenance (html); the table a
single run logs (text). Nothing here runs a method: harness/comparison.py does, and hands its payloads here.

A results payload is what harness.run.evaluate returns and writes as results.json."""
from harness.report.model import (METRICS, Column, CompareError, Row, Table, column_labels, payload_cells,
                                  record_columns)
from harness.report.runs import (SEED_KEY, aggregate, check_same_experiment, group_runs, load_results, merge,
                                 run_config, run_label)
from harness.report.table import build_table, tables_from_results
from harness.report.writers import to_csv, to_figure, to_latex, to_markdown, write_table

__all__ = ["METRICS", "Column", "CompareError", "Row", "SEED_KEY", "Table", "aggregate", "build_table",
           "check_same_experiment", "column_labels", "group_runs", "load_results", "merge", "payload_cells",
           "record_columns", "run_config", "run_label", "tables_from_results", "to_csv", "to_figure", "to_latex",
           "to_markdown", "write_table"]
