"""Every shell command of README.md, docs/*.md and the docstrings of the entry points (test_time.py,
scripts/compare.py, scripts/grid.py), in a code block or, in README.md and docs/*.md, inline in the prose (a code
span that starts with a program and gives it arguments, e.g. `python scripts/bench_views.py`), runs here as it is
written (``python`` and ``.venv/bin/python`` are this interpreter), in a copy of the checkout without its ./data
and ./output, and does what COMMANDS says it does on a machine without the paper's data: it succeeds (exit status
0, with what it printed or wrote), or it stops in one line, ``error: ...`` with exit status 2, naming what is
missing (the data under /data, ViT-B-16's OpenAI weights, a partition named gpu, a GPU), so every flag, key and
path before that point holds. A command the docs show that COMMANDS lacks fails the test (add it, with its
outcome), and so does an entry of COMMANDS the docs no longer show.

The SLURM commands run on the single-node cluster of scripts/slurm_local.sh (skipped, saying why, where it cannot
start). The commands too heavy to repeat inside the tests (the set-up, the whole suite, the full demo, the
benchmarks, recording the golden runs) are checked to be what CI and the tests run, or parsed by the script's own
parser, as each entry says. The entry points run in this process (their ``main(argv)``); the shell commands in a
shell."""
from __future__ import annotations

import argparse
import ast
import functools
import importlib.util
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from harness import grid as grids
from harness import launch
from tests.grid_support import wait_until
from tests.synthetic import write_cifar_c

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOCSTRINGS = [ROOT / "test_time.py", ROOT / "scripts" / "compare.py", ROOT / "scripts" / "grid.py"]
ENTRY_POINTS = ("test_time.py", "scripts/compare.py", "scripts/grid.py", "scripts/make_corrupted.py")  # in process
PYTHONS = ("python", ".venv/bin/python")
SHELL_FENCES = {"bash", "sh", "shell", "console"}
# What a shell command line starts with (after VAR=value assignments and a subshell's parenthesis): in an indented
# block or an unlabelled fence, a line that starts otherwise is YAML, Python or a formula, not a command.
PROGRAMS = {"python", "python3", ".venv/bin/python", "bash", "sh", "sudo", "pytest", "pip", "uv", "git", "cd",
            "export", "source", "ulimit", "apt-get", "srun", "sbatch", "squeue", "scancel", "sinfo", "sacct",
            "scontrol", "nvidia-smi", "make"}
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=\S*")
# A code span in the prose (`...`, possibly over a line break, never over a blank line): a command where it starts
# with one of PROGRAMS (after VAR=value assignments) and gives it arguments; `python`, `sinfo` or `test_time.py
# --restart` alone name a program or an option, and a template (`--cfg <its config>`) is written so that it does not
# start with a program.
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)((?:(?!\n[ \t]*\n).)+?)(?<!`)\1(?!`)", re.S)


# ------------------------------------------------------------------------------------------------ the docs' commands

def _is_command(line: str) -> bool:
    words = line.lstrip("(").split()
    while words and ASSIGNMENT.fullmatch(words[0]):
        words = words[1:]
    return bool(words) and (words[0] in PROGRAMS or words[0].endswith((".sh", ".py")) or words[0].startswith("./"))


def _is_inline_command(span: str) -> bool:
    words = span.lstrip("(").split()
    while words and ASSIGNMENT.fullmatch(words[0]):
        words = words[1:]
    return len(words) > 1 and words[0] in PROGRAMS


def _without_comment(line: str) -> str:
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def normalise(command: str) -> str:
    """A command as COMMANDS holds it: without its trailing comment, its spaces collapsed."""
    return " ".join(_without_comment(command).split())


def _code_blocks(text: str):
    """(first line's number, fence language or None for an indented block, the block's lines)."""
    lines = text.splitlines()
    i, after_blank = 0, True
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"\s*(```|~~~)\s*([\w+-]*)", line)
        if fence:
            end = i + 1
            while end < len(lines) and not lines[end].strip().startswith(fence.group(1)):
                end += 1
            yield i + 2, fence.group(2).lower(), lines[i + 1:end]
            i, after_blank = end + 1, False
            continue
        if after_blank and line.startswith("    ") and line.strip():
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            yield i + 1, None, [text_line[4:] for text_line in lines[i:end]]
            i, after_blank = end, not lines[end - 1].strip()
            continue
        after_blank = not line.strip()
        i += 1


def _logical_lines(lines: list[str]):
    """(offset, line) with backslash continuations joined."""
    start, pending = 0, ""
    for k, line in enumerate(lines):
        if not pending:
            start = k
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""
    if pending:
        yield start, pending


def _commands_in(text: str, source: str, first_line: int = 1, inline: bool = False):
    """(command, "source:line") of the code blocks' commands, then (``inline``) those of the prose's code spans."""
    prose = text.splitlines()
    for number, language, lines in _code_blocks(text):
        fenced = language is not None
        for k in range(number - 1 - fenced, min(number - 1 + len(lines) + fenced, len(prose))):
            prose[k] = ""                                 # a backtick in a code block opens no code span
        if language is not None and language not in SHELL_FENCES and language != "":
            continue
        every_line = language in SHELL_FENCES
        for offset, line in _logical_lines(lines):
            command = normalise(line)
            if command and (every_line or _is_command(command)):
                yield command, f"{source}:{first_line + number - 1 + offset}"
    if inline:
        newline = "\n"
        prose_text = newline.join(prose)
        for span in CODE_SPAN.finditer(prose_text):
            command = " ".join(span.group(2).split())
            if _is_inline_command(command):
                yield command, f"{source}:{first_line + prose_text.count(newline, 0, span.start())}"


def documented_commands() -> dict[str, list[str]]:
    """{command: where the docs show it}."""
    found: dict[str, list[str]] = {}
    for path in DOCS:
        for command, where in _commands_in(path.read_text(), str(path.relative_to(ROOT)), inline=True):
            found.setdefault(command, []).append(where)
    for path in DOCSTRINGS:
        module = ast.parse(path.read_text())
        docstring = ast.get_docstring(module, clean=False) or ""
        first = module.body[0].lineno if module.body else 1
        for command, where in _commands_in(docstring, str(path.relative_to(ROOT)), first):
            found.setdefault(command, []).append(where)
    return found


# ------------------------------------------------------------------------------------------------ the outcomes

@dataclass(frozen=True)
class Succeeds:
    """Exit status 0; each regular expression of ``printed`` is found in what it printed (stdout or stderr);
    ``wrote`` exist in the copy."""
    printed: str | tuple[str, ...]
    wrote: tuple[str, ...] = ()
    shapes: bool = False          # reads ./data/Shapes-C (what scripts/demo.py writes)
    slurm: bool = False           # on the single-node SLURM


@dataclass(frozen=True)
class Refused:
    """Exit status 2 and one line on stderr, ``error: ...``, that matches ``names`` (what is missing here)."""
    names: str
    slurm: bool = False
    without_gpu: bool = False     # the refusal of a machine without a GPU (not tried where CUDA is available)


@dataclass(frozen=True)
class RunElsewhere:
    """Too heavy to repeat inside the tests: each (file, regular expression) of ``proof`` matches a line of the
    file, showing where it runs (a step of .ci/run, the test that runs the same entry point)."""
    why: str
    proof: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Parsed:
    """A benchmark (minutes of CPU, or a GPU), or a command that rewrites a recorded file: the script's (or the
    ``-m`` module's) own argument parser accepts the command line; not run."""
    why: str


# What a run on the paper's data stops at here: ViT-B-16's OpenAI weights where they are neither cached nor
# downloadable (test_time.py checks the weights first), else the data set's folder under DATA_DIR.
def weights_or_data(data_dir: str) -> str:
    return rf"'ViT-B-16' / pretrained tag 'openai' are not in the local cache|directory {data_dir}/\S+ does not exist"


PAPER_DATA = weights_or_data("/data")
NO_CUPL_FILE = r"^DPE.CUPL_PROMPTS = '/path/CuPL_prompts_imagenet.json': no such file"    # the reference's file
SHAPES_DATA = r"^shapes_c: data directory data/Shapes-C does not exist"     # before scripts/demo.py wrote it
DEFAULT_DATA = weights_or_data(r"(\./)?data")
RN50_PAPER_DATA = PAPER_DATA.replace("'ViT-B-16'", "'RN50'")      # the BatchNorm methods' CLIP
# EATA's Fisher term reads the source training set, checked before the weights (issue 30)
EATA_SOURCE = r"^eata on cifar10_c reads its source training set .*/data/cifar-10-batches-py/data_batch_1 does not exist"
# An RLCF run may also stop at its reward model's weights (RLCF.REWARD_WEIGHTS: ViT-L-14's OpenAI ones).
RLCF_REWARD_WEIGHTS = r"|'ViT-L-14' / pretrained tag 'openai' are not in the local cache"
GRID_INPUTS = r"grids/paper_main.yaml: cell \(cifar10_c, source, seed 1\): (CLIP weights 'ViT-B-16' / pretrained " \
              r"tag 'openai' are not in the local cache|DATA_DIR /data: no such folder)"
NO_GPU_PARTITION = r"^--partition gpu: this cluster has no such partition; its partitions \(sinfo\): debug$"
PAPER_TABLES = ("output/grids/paper_main/tables/cifar10_c.md", "output/grids/paper_main/tables/imagenet_c.csv")
CI_SETUP = (".ci/run", r"^bash scripts/setup\.sh\b")                   # a line of .ci/run
CI_TESTS = (".ci/run", r"^\s*\.venv/bin/python -m pytest -q$")
DEMO_TEST = ("tests/test_demo.py", r"\bdemo\.main\(")
TESTS_IN = r"^def test_"
BENCHMARK = "a benchmark: minutes on the CPU, its figures are in the docs"
GPU_BENCHMARK = "a benchmark on a GPU; not measured yet"
RECORD_WRITE = "records golden runs (four CPU paths each): it would rewrite the records in tests/data/records/"

COMMANDS = {
    # README.md
    "bash scripts/setup.sh && .venv/bin/python scripts/demo.py": RunElsewhere(
        "the set-up, then the full demo (two minutes): .ci/run runs the set-up; tests/test_demo.py runs the demo's "
        "main() on a reduced setting", (CI_SETUP, DEMO_TEST)),
    "bash scripts/setup.sh && .venv/bin/python -m pytest -q": RunElsewhere(
        "the set-up and the whole suite, this file included: .ci/run runs exactly these two steps",
        (CI_SETUP, CI_TESTS)),
    "python test_time.py --cfg conf/cifar10_c/batclip.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar10_c/source.yaml DATA_DIR /data MODEL.ARCH ViT-B-16 MODEL.WEIGHTS openai":
        Refused(PAPER_DATA),
    "python scripts/compare.py --cfg conf/cifar10_c/source.yaml --methods source tent sar batclip DATA_DIR /data":
        Refused(PAPER_DATA),
    "python scripts/compare.py --cfg conf/cifar10_c/source.yaml --methods source batclip --seeds 1 2 3 DATA_DIR /data":
        Refused(PAPER_DATA),
    "python scripts/compare.py --results output/cifar10_c --metric error --out tables/":
        Refused(r"^output/cifar10_c: no such results file$"),
    "python scripts/grid.py run grids/paper_main.yaml --launcher slurm --partition gpu DATA_DIR /data":
        Refused(NO_GPU_PARTITION, slurm=True),
    "python scripts/grid.py run grids/tiny.yaml --launcher local --parallel 2": Succeeds(
        r"tiny: 4 done, 0 running, 0 failed, 0 pending of 4 jobs", ("output/grids/tiny/tables/shapes_c.md",),
        shapes=True),
    "python scripts/grid.py status grids/paper_main.yaml DATA_DIR /data":
        Succeeds(r"paper_main: 0 done, 0 running, 0 failed, 450 pending of 450 jobs"),
    "python scripts/grid.py report grids/paper_main.yaml DATA_DIR /data":
        Succeeds(r"wrote output/grids/paper_main/tables/imagenet_c.md", PAPER_TABLES),
    ".venv/bin/python scripts/bench_batclip_step.py --shape cifar --batch 16 --warmup 1 --repeats 3 --device cpu":
        Parsed(BENCHMARK),
    "python test_time.py --cfg conf/cifar10_c/batclip.yaml --show-config":
        Succeeds((r"(?m)^CORRUPTION:\n  DATASET: cifar10_c$", r"(?m)^  ADAPTATION: batclip$")),
    "pytest -m cuda": RunElsewhere(
        "the CUDA tests, a part of the whole suite, which .ci/run runs (they skip, saying why, without a GPU)",
        (CI_TESTS, ("tests/test_cuda.py", r"^pytestmark = \[pytest\.mark\.cuda\b"), ("tests/test_cuda.py", TESTS_IN))),
    "python -m tests.record cifar10_c/tent": Parsed(RECORD_WRITE),
    "python -m tests.record cifar10_c/my_method imagenet_c/my_method shapes_c/my_method": RunElsewhere(
        "records the method README's guide adds, only once its files are saved; tried by hand as a newcomer (the "
        "closing note of issue 25), and each test that misses a record prints this command with the names",
        (("tests/test_configs.py", r"python -m tests\.record \{' '\.join\(missing\)\}"),
         ("tests/test_golden_runs.py", r"python -m tests\.record \{' '\.join\(missing\)\}"))),
    "python scripts/compose_configs.py": Succeeds(r"(?m)^\d+ shipped configs in conf/: 0 written, 0 deleted$"),
    "python -m tests.golden --cpu-paths": Parsed("runs every shipped config on four CPU paths: minutes on the CPU"),
    # README.md and docs/demo.md
    ".venv/bin/python scripts/bench_demo.py --repeats 3": Parsed(BENCHMARK),
    # README.md and docs/demo.md: the demo's table from the shipped configs, on the data scripts/demo.py writes
    ".venv/bin/python scripts/compare.py --cfg conf/shapes_c/source.yaml --methods source tent batclip "
    "CORRUPTION.NUM_EX 2000": Refused(SHAPES_DATA),
    # README.md's "Adding a method": the method the section adds is not shipped (tests/test_docs_examples.py adds it)
    ".venv/bin/python scripts/compare.py --cfg conf/shapes_c/source.yaml --methods source tent batclip my_method "
    "CORRUPTION.NUM_EX 2000 SAVE_DIR output/demo":
        # before the guide's files are saved; after, it stops where every demo command does here (no ./data)
        Refused(r"^no config conf/shapes_c/my_method.yaml for method 'my_method' on shapes_c|" + SHAPES_DATA),
    ".venv/bin/python test_time.py --cfg conf/shapes_c/my_method.yaml": RunElsewhere(
        "the method the section adds is not shipped: tests/test_docs_examples.py adds it, then runs this command line, "
        "read from the README, on a small Shapes-C",
        (("tests/test_docs_examples.py", r"`\\\.venv/bin/python test_time\\\.py \(--cfg conf/shapes_c/my_method"),
         ("tests/test_docs_examples.py", r"test_time\.main\(\[\*run\.group\(1\)\.split\(\)"))),
    "python test_time.py --cfg conf/cifar10_c/my_method.yaml DATA_DIR /data":
        # before the guide's files are saved; after, the paper's data or weights are what is missing
        Refused(r"^Config file conf/cifar10_c/my_method.yaml does not exist; configs shipped for cifar10_c: |"
                + PAPER_DATA),
    # docs/adding_a_dataset.md: the data set the page adds is not shipped (tests/test_docs_examples.py adds it)
    "python test_time.py --cfg conf/toys/source.yaml DATA_DIR /data":
        Refused(r"^Config file conf/toys/source.yaml does not exist$"),
    # docs/baselines_norm.md
    "python test_time.py --cfg conf/cifar10_c/tent.yaml DATA_DIR ./data": Refused(DEFAULT_DATA),
    "python test_time.py --cfg conf/imagenet_c/sar.yaml DATA_DIR ./data": Refused(DEFAULT_DATA),
    "python test_time.py --cfg conf/cifar100_c/rotta.yaml DATA_DIR ./data ROTTA.NU 0.001": Refused(DEFAULT_DATA),
    ".venv/bin/python -m pytest -q tests/test_baselines_norm.py": RunElsewhere(
        "a part of the whole suite, which .ci/run runs", (CI_TESTS, ("tests/test_baselines_norm.py", TESTS_IN))),
    # docs/batclip.md
    ".venv/bin/python test_time.py --cfg conf/cifar10_c/batclip.yaml DATA_DIR /data": Refused(PAPER_DATA),
    ".venv/bin/python test_time.py --cfg conf/cifar100_c/batclip.yaml DATA_DIR /data": Refused(PAPER_DATA),
    ".venv/bin/python test_time.py --cfg conf/imagenet_c/batclip.yaml DATA_DIR /data": Refused(PAPER_DATA),
    ".venv/bin/python -m pytest -q tests/test_batclip.py tests/test_text_truncation.py": RunElsewhere(
        "a part of the whole suite, which .ci/run runs",
        (CI_TESTS, ("tests/test_batclip.py", TESTS_IN), ("tests/test_text_truncation.py", TESTS_IN))),
    ".venv/bin/python scripts/bench_batclip_step.py": Parsed(BENCHMARK),
    ".venv/bin/python scripts/bench_batclip_step.py --shape imagenet --repeats 5": Parsed(BENCHMARK),
    ".venv/bin/python scripts/bench_batclip_step.py --arch tiny-clip-test": Parsed(BENCHMARK),
    "(ulimit -v 22000000; .venv/bin/python scripts/bench_batclip_step.py --shape imagenet --batch 4 --warmup 0 "
    "--repeats 1 --device cpu)": Parsed(BENCHMARK),
    # docs/clipartt.md, docs/cliptta.md
    "python test_time.py --cfg conf/cifar10_c/clipartt.yaml": Refused(DEFAULT_DATA),
    "python test_time.py --cfg conf/imagenet_c/clipartt.yaml OPTIM.STEPS 5": Refused(DEFAULT_DATA),
    "python test_time.py --cfg conf/cifar10_c/clipartt.yaml CLIPARTT.TARGET_NORMALIZATION row "
    "CLIPARTT.DETACH_TARGETS True": Refused(DEFAULT_DATA),
    "python test_time.py --cfg conf/cifar10_c/cliptta.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar100_c/cliptta.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar10_c/cliptta_otsu.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar100_c/cliptta_otsu.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/imagenet_c/cliptta_otsu.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/imagenet_c/cliptta.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar10_c/cliptta.yaml CLIPTTA.LOSS_SIDES symmetric DATA_DIR /data":
        Refused(PAPER_DATA),
    # docs/cluster.md
    "python scripts/grid.py run grids/paper_main.yaml --launcher slurm --partition gpu --retry-failed DATA_DIR /data":
        Refused(NO_GPU_PARTITION, slurm=True),
    "python scripts/grid.py run grids/paper_main.yaml --launcher slurm --partition gpu --gpus-per-job 1 "
    "--cpus-per-job 8 --mem-gb 32 --timeout-min 240 --array-parallelism 16 --slurm-param account=myproject "
    "--setup 'module load cuda/12.4' DATA_DIR /shared/data SAVE_DIR /shared/tta-output":
        Refused(NO_GPU_PARTITION, slurm=True),
    # a job of the tiny grid (docs/cluster.md's "Jobs"), on the data scripts/demo.py writes
    "python test_time.py --cfg conf/shapes_c/tent.yaml DATA_DIR ./data SAVE_DIR ./output CORRUPTION.TYPE "
    "\"[gaussian_noise, fog]\" CORRUPTION.NUM_EX 400 TEST.BATCH_SIZE 100 RNG_SEED 1 SETTING reset_each_shift "
    "RUN_DOMAINS \"[fog]\"": Succeeds(
        r"(?m)^results: output/shapes_c/tent/tiny-clip-shapes_reset_each_shift_seed1_[0-9a-f]{8}/results\.json$",
        shapes=True),
    "bash scripts/slurm_local.sh install": Succeeds(r"slurm_local: (already )?installed", slurm=True),
    "bash scripts/slurm_local.sh start": Succeeds(r"slurm_local: up: partition debug", slurm=True),
    "python scripts/grid.py run grids/tiny.yaml --launcher slurm --partition debug --no-wait": Succeeds(
        (r"SLURM: 0 GPU\(s\) per job \(partition debug has no GPUs", r"submitted 4 jobs with --launcher slurm"),
        ("output/grids/tiny/submissions.jsonl",), shapes=True, slurm=True),
    "python scripts/grid.py status grids/tiny.yaml": Succeeds(r"tiny: \d done, \d running, 0 failed, \d pending of 4 "
                                                              r"jobs", shapes=True, slurm=True),
    "bash scripts/slurm_local.sh stop": RunElsewhere(
        "it stops the single-node SLURM: tests/test_slurm.py and this file's slurm fixture run it when they are done "
        "(where they started it)",
        (("tests/test_slurm.py", r'subprocess\.run\(\["bash", str\(SCRIPT\), "stop"\]'),
         ("tests/test_documented_commands.py", r'subprocess\.run\(\[\*script, "stop"\]'))),
    "python scripts/grid.py run grids/paper_main.yaml --launcher local DATA_DIR /data": Refused(GRID_INPUTS),
    "CUDA_VISIBLE_DEVICES=2,3 python scripts/grid.py run grids/paper_main.yaml --launcher local --gpus-per-job 1 "
    "DATA_DIR /data": Refused(r"^--gpus-per-job 1: 0 GPU\(s\) visible here$", without_gpu=True),
    "python scripts/bench_grid.py --launchers debug local1 local2 slurm": Parsed(
        "a benchmark of the launchers (minutes; its slurm part on the single-node SLURM), its figures are in the docs"),
    # docs/comparison.md
    "python scripts/compare.py --cfg conf/cifar10_c/source.yaml --methods source tent batclip DATA_DIR /data":
        Refused(PAPER_DATA),
    "python scripts/compare.py --cfg conf/cifar10_c/source.yaml --methods batclip my_variant.yaml --seeds 1 2 3 "
    "--metric error --figure heatmap --out results/c10 DATA_DIR /data": Refused(r"my_variant\.yaml"),
    "python scripts/compare.py --results output/cifar10_c": Refused(r"^output/cifar10_c: no such results file$"),
    "python scripts/compare.py --results a/results.json b/ --metric error --no-paper --out tables/":
        Refused(r"^a/results.json: no such results file$"),
    "python scripts/compare.py --merge m1/results.json m2/results.json --out merged/":
        Refused(r"^m1/results.json: no such results file$"),
    # docs/demo.md
    "python scripts/demo.py": RunElsewhere(
        "the full demo (two minutes): tests/test_demo.py runs its main() on a reduced setting", (DEMO_TEST,)),
    "python scripts/make_corrupted.py --images clean.npy --labels labels.npy --out ./data --name MySet":
        Refused(r"^cannot read --images 'clean.npy' as a .npy array"),
    "python scripts/make_corrupted.py --folder /path/to/images --size 32 --out ./data --name MySet":
        Refused(r"^image folder /path/to/images does not exist"),
    "pip install '.[corruptions]'": RunElsewhere(
        "installs the corruptions extra into the environment: scripts/setup.sh, which .ci/run runs, installs it",
        (CI_SETUP, ("scripts/setup.sh", r"--extra corruptions\b"), ("pyproject.toml", r"^corruptions = \["))),
    # docs/domain_generalisation.md
    "python test_time.py --cfg conf/pacs/source.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/pacs/tent.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/pacs/batclip.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/office_home/batclip.yaml DATA_DIR /data CORRUPTION.TYPE \"['Real World']\"":
        Refused(PAPER_DATA),
    "python test_time.py --cfg conf/imagenet_a/batclip.yaml DATA_DIR /data": Refused(PAPER_DATA),
    # docs/ctpt.md
    "python test_time.py --cfg conf/imagenet_a/ctpt.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/imagenet_c/ctpt.yaml DATA_DIR /data CORRUPTION.TYPE \"['none']\"":
        Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar10_c/ctpt.yaml": Refused(DEFAULT_DATA),
    ".venv/bin/python -m pytest -q tests/test_ctpt.py": RunElsewhere(
        "a part of the whole suite, which .ci/run runs", (CI_TESTS, ("tests/test_ctpt.py", TESTS_IN))),
    # docs/onzeta.md
    "python test_time.py --cfg conf/caltech101/onzeta.yaml DATA_DIR /data ONZETA.BETA 0.4 ONZETA.ALPHA 0.0":
        Refused(PAPER_DATA),
    "python test_time.py --cfg conf/imagenet_c/onzeta.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/imagenet_a/onzeta.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar10_c/onzeta.yaml": Refused(DEFAULT_DATA),
    ".venv/bin/python -m pytest -q tests/test_onzeta.py": RunElsewhere(
        "a part of the whole suite, which .ci/run runs", (CI_TESTS, ("tests/test_onzeta.py", TESTS_IN))),
    # docs/rlcf.md
    "python test_time.py --cfg conf/imagenet_a/rlcf.yaml DATA_DIR /data": Refused(PAPER_DATA + RLCF_REWARD_WEIGHTS),
    "python test_time.py --cfg conf/imagenet_c/rlcf.yaml DATA_DIR /data CORRUPTION.TYPE \"['none']\"":
        Refused(PAPER_DATA + RLCF_REWARD_WEIGHTS),
    "python test_time.py --cfg conf/dtd/rlcf.yaml DATA_DIR /data RLCF.REWARD_ARCH ViT-B-16": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar10_c/rlcf.yaml": Refused(DEFAULT_DATA + RLCF_REWARD_WEIGHTS),
    ".venv/bin/python -m pytest -q tests/test_rlcf.py": RunElsewhere(
        "a part of the whole suite, which .ci/run runs", (CI_TESTS, ("tests/test_rlcf.py", TESTS_IN))),
    # docs/rtpt.md
    "python test_time.py --cfg conf/imagenet_a/rtpt.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/imagenet_c/rtpt.yaml DATA_DIR /data CORRUPTION.TYPE \"['none']\"":
        Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar10_c/rtpt.yaml": Refused(DEFAULT_DATA),
    ".venv/bin/python -m pytest -q tests/test_rtpt.py": RunElsewhere(
        "a part of the whole suite, which .ci/run runs", (CI_TESTS, ("tests/test_rtpt.py", TESTS_IN))),
    # docs/dynaprompt.md
    "python test_time.py --cfg conf/imagenet_a/dynaprompt.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/imagenet_c/dynaprompt.yaml DATA_DIR /data CORRUPTION.TYPE \"['none']\"":
        Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar10_c/dynaprompt.yaml": Refused(DEFAULT_DATA),
    ".venv/bin/python -m pytest -q tests/test_dynaprompt.py": RunElsewhere(
        "a part of the whole suite, which .ci/run runs", (CI_TESTS, ("tests/test_dynaprompt.py", TESTS_IN))),
    # docs/tps.md
    "python test_time.py --cfg conf/imagenet_a/tps.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/imagenet_c/tps.yaml DATA_DIR /data CORRUPTION.TYPE \"['none']\"":
        Refused(PAPER_DATA),
    "python test_time.py --cfg conf/dtd/tps.yaml DATA_DIR /data TPS.PROTOTYPES templates_and_descriptions "
    "TPS.DESCRIPTIONS /path/dtd-gpt4.json": Refused(r"^TPS.DESCRIPTIONS = '/path/dtd-gpt4.json': no such file"),
    "python test_time.py --cfg conf/cifar10_c/tps.yaml": Refused(DEFAULT_DATA),
    ".venv/bin/python -m pytest -q tests/test_tps.py": RunElsewhere(
        "a part of the whole suite, which .ci/run runs", (CI_TESTS, ("tests/test_tps.py", TESTS_IN))),
    # docs/ttl.md
    "python test_time.py --cfg conf/imagenet_a/ttl.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/imagenet_c/ttl.yaml DATA_DIR /data CORRUPTION.TYPE \"['none']\"":
        Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar10_c/ttl.yaml": Refused(DEFAULT_DATA),
    ".venv/bin/python -m pytest -q tests/test_ttl.py": RunElsewhere(
        "a part of the whole suite, which .ci/run runs", (CI_TESTS, ("tests/test_ttl.py", TESTS_IN))),
    # docs/dpe.md
    "python test_time.py --cfg conf/imagenet_a/dpe.yaml DATA_DIR /data DPE.CUPL_PROMPTS "
    "/path/CuPL_prompts_imagenet.json": Refused(NO_CUPL_FILE),
    "python test_time.py --cfg conf/imagenet_c/dpe.yaml DATA_DIR /data DPE.CUPL_PROMPTS "
    "/path/CuPL_prompts_imagenet.json": Refused(NO_CUPL_FILE),
    "python test_time.py --cfg conf/dtd/dpe.yaml DATA_DIR /data DPE.CUPL_PROMPTS /path/CuPL_prompts_dtd.json":
        Refused(r"^DPE.CUPL_PROMPTS = '/path/CuPL_prompts_dtd.json': no such file"),
    "python test_time.py --cfg conf/dtd/dpe.yaml DATA_DIR /data DPE.TEXT_PROTOTYPES templates": Refused(PAPER_DATA),
    # docs/performance.md
    "python scripts/bench_methods.py --device cuda --write docs/performance.md": Parsed(
        "a benchmark on a GPU; it rewrites docs/performance.md"),
    "python scripts/bench_methods.py --device cpu --shapes cifar10 --batch 4 --steps 1 --warmup 1 --methods source "
    "tent rpl sar rotta batclip stata vte tpt": Parsed(BENCHMARK),
    "python -m tests.record --all": Parsed(RECORD_WRITE),
    **{f"python -m tests.record shapes_c/example_{kind} cifar10_c/example_{kind}": RunElsewhere(
        "records a worked example of docs/adding_a_method.md, only once its files are saved; tried by hand as a "
        "newcomer (the closing note of issue 25)",
        (("tests/test_configs.py", r"python -m tests\.record \{' '\.join\(missing\)\}"),))
       for kind in ("norm", "views", "cache")},
    "python -m tests.golden --other-cpu-path": Succeeds(r"(?m)^MKL_CBWR=\S+ ONEDNN_MAX_CPU_ISA=\S+ "
                                                        r"ATEN_CPU_CAPABILITY=\S+$"),
    # docs/tpt_vte.md
    "python scripts/bench_views.py": Parsed(BENCHMARK),
    "python scripts/bench_views.py --device cuda --batch 8": Parsed(GPU_BENCHMARK),
    "python test_time.py --cfg conf/cifar10_c/tpt.yaml": Refused(DEFAULT_DATA),
    "python test_time.py --cfg conf/cifar10_c/vte.yaml": Refused(DEFAULT_DATA),
    "python test_time.py --cfg conf/cifar10_c/vte.yaml TEST.N_AUGMENTATIONS 16 VTE.SELECTION_P 0.25":
        Refused(DEFAULT_DATA),
    ".venv/bin/python -m pytest -q tests/test_augmentations.py tests/test_tpt.py tests/test_vte.py": RunElsewhere(
        "a part of the whole suite, which .ci/run runs",
        (CI_TESTS, ("tests/test_augmentations.py", TESTS_IN), ("tests/test_tpt.py", TESTS_IN),
         ("tests/test_vte.py", TESTS_IN))),
    # docs/watt_stata.md
    "python test_time.py --cfg conf/cifar10_c/watt_p.yaml": Refused(DEFAULT_DATA),
    "python test_time.py --cfg conf/cifar10_c/watt_s.yaml": Refused(DEFAULT_DATA),
    "python test_time.py --cfg conf/imagenet_c/stata.yaml": Refused(DEFAULT_DATA),
    "python test_time.py --cfg conf/imagenet_c/stata_gamma_m1.yaml": Refused(DEFAULT_DATA),
    "python test_time.py --cfg conf/cifar10_c/watt_s.yaml WATT.REPEATS 1 WATT.TEMPLATES \"['a photo of a {}.']\"":
        Refused(DEFAULT_DATA),
    # docs/zero.md
    "python test_time.py --cfg conf/imagenet_a/zero.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/imagenet_c/zero.yaml DATA_DIR /data CORRUPTION.TYPE \"['none']\"":
        Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar10_c/zero.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/oxford_pets/zero.yaml DATA_DIR /data": Refused(PAPER_DATA),
    # docs/boostadapter.md
    "python test_time.py --cfg conf/imagenet_a/boostadapter.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/imagenet_c/boostadapter.yaml DATA_DIR /data CORRUPTION.TYPE \"['none']\"":
        Refused(PAPER_DATA),
    "python test_time.py --cfg conf/dtd/boostadapter.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/dtd/boostadapter.yaml DATA_DIR /data BOOSTADAPTER.VIEW_AUGMENTATION augmix "
    "BOOSTADAPTER.LOGIT_SCALE model BOOSTADAPTER.ENTROPY epsilon": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar10_c/boostadapter.yaml": Refused(DEFAULT_DATA),
    ".venv/bin/python -m pytest -q tests/test_boostadapter.py": RunElsewhere(
        "a part of the whole suite, which .ci/run runs", (CI_TESTS, ("tests/test_boostadapter.py", TESTS_IN))),
    # docs/dmn.md
    "python test_time.py --cfg conf/imagenet_a/dmn.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/imagenet_c/dmn.yaml DATA_DIR /data CORRUPTION.TYPE \"['none']\"":
        Refused(PAPER_DATA),
    "python test_time.py --cfg conf/dtd/dmn.yaml DATA_DIR /data DMN.TEXT_PROMPTS templates_and_cupl "
    "DMN.CUPL_PROMPTS /path/CuPL_prompts_dtd.json":
        Refused(r"^DMN.CUPL_PROMPTS = '/path/CuPL_prompts_dtd.json': no such file"),
    "python test_time.py --cfg conf/imagenet_a/dmn_weak.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar10_c/dmn.yaml": Refused(DEFAULT_DATA),
    # docs/ecalp.md
    "python test_time.py --cfg conf/imagenet_a/ecalp.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/imagenet_c/ecalp.yaml DATA_DIR /data CORRUPTION.TYPE \"['none']\"":
        Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar10_c/ecalp.yaml": Refused(DEFAULT_DATA),
    # docs/oga.md
    "python test_time.py --cfg conf/imagenet_c/oga.yaml DATA_DIR /data CORRUPTION.TYPE \"['none']\"":
        Refused(PAPER_DATA),
    "python test_time.py --cfg conf/dtd/oga.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/dtd/oga.yaml DATA_DIR /data CLIP.PROMPT_TEMPLATE \"['itap of a {}.', "
    "'a bad photo of the {}.', 'a origami {}.', 'a photo of the large {}.', 'a {} in a video game.', 'art of the {}', "
    "'a photo of the small {}']\"": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar10_c/oga.yaml": Refused(DEFAULT_DATA),
    # docs/tca.md
    "python test_time.py --cfg conf/imagenet_a/tca.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar10_c/tca.yaml": Refused(DEFAULT_DATA),
    ".venv/bin/python -m pytest -q tests/test_tca.py": RunElsewhere(
        "a part of the whole suite, which .ci/run runs", (CI_TESTS, ("tests/test_tca.py", TESTS_IN))),
    # docs/mta.md
    "python test_time.py --cfg conf/imagenet_a/mta.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/imagenet_c/mta.yaml DATA_DIR /data CORRUPTION.TYPE \"['none']\"":
        Refused(PAPER_DATA),
    "python test_time.py --cfg conf/oxford_pets/mta.yaml DATA_DIR /data": Refused(PAPER_DATA),
    # docs/deyo.md
    "python test_time.py --cfg conf/cifar10_c/deyo.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar100_c/deyo.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/imagenet_c/deyo.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar10_c/deyo.yaml DEYO.AUG_TYPE pixel DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg tests/data/authors_configs/anchor/cifar10_c/deyo.yaml MODEL.ARCH ViT-B-16 "
    "DATA_DIR /data": Refused(PAPER_DATA),
    # docs/lame.md, docs/calip.md
    "python test_time.py --cfg conf/cifar10_c/lame.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar100_c/lame.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/imagenet_c/lame.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar10_c/lame.yaml LAME.AFFINITY kNN LAME.UNARY_LOGITS cosine DATA_DIR /data":
        Refused(PAPER_DATA),
    "python test_time.py --cfg tests/data/authors_configs/anchor/cifar10_c/lame.yaml MODEL.ARCH ViT-B-16 "
    "DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar10_c/calip.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar100_c/calip.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/imagenet_c/calip.yaml DATA_DIR /data": Refused(PAPER_DATA),
    # docs/cotta.md
    "python test_time.py --cfg conf/cifar10_c/cotta.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar100_c/cotta.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/imagenet_c/cotta.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg tests/data/authors_configs/anchor/cifar10_c/cotta.yaml MODEL.ARCH ViT-B-16 "
    "DATA_DIR /data": Refused(PAPER_DATA),
    # docs/roid_cmf.md
    "python test_time.py --cfg conf/cifar10_c/roid.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/imagenet_c/cmf.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg tests/data/authors_configs/anchor/cifar10_c/roid.yaml MODEL.ARCH ViT-B-16 "
    "DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg tests/data/authors_configs/anchor/imagenet_c/cmf.yaml MODEL.ARCH ViT-B-16 "
    "DATA_DIR /data": Refused(PAPER_DATA),
    # docs/unient.md
    "python test_time.py --cfg conf/cifar10_c/unient.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar100_c/unient.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/imagenet_c/unient.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar10_c/unient.yaml UNIENT.WEIGHTING hard UNIENT.USE_OOD_LOSS True "
    "UNIENT.ENTROPY_EPS 0 DATA_DIR /data": Refused(PAPER_DATA),
    # docs/ostta.md
    "python test_time.py --cfg conf/cifar10_c/ostta.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar100_c/ostta.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/imagenet_c/ostta.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar10_c/ostta.yaml OSTTA.MARGIN 0.0 DATA_DIR /data": Refused(PAPER_DATA),
    # README.md, docs/open_set.md
    "python test_time.py --cfg conf/open_set/cifar10_c+svhn_c/cliptta_otsu.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/open_set/imagenet_c+places_c/unient.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar10_c/tent.yaml OPEN_SET.OOD_DATASET cifar100_c DATA_DIR /data":
        Refused(PAPER_DATA),
    "python scripts/compare.py --results output/cifar10_c --metric auroc":
        Refused(r"^output/cifar10_c: no such results file$"),
    # docs/ood_sets.md
    "python scripts/make_corrupted.py --images svhn_test_images.npy --labels svhn_test_labels.npy --out /data "
    "--name SVHN": Refused(r"^cannot read --images 'svhn_test_images.npy' as a .npy array"),
    # docs/sotta.md, docs/stamp.md
    "python test_time.py --cfg conf/cifar10_c/sotta.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar100_c/sotta.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/imagenet_c/sotta.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar10_c/sotta.yaml SOTTA.OOD_LOGIT_SCALE 100.0 SOTTA.LOSS_ON memory_batch "
    "SOTTA.USE_SAM True DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar10_c/stamp.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar100_c/stamp.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/imagenet_c/stamp.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar10_c/stamp.yaml STAMP.USE_CONSISTENCY_FILTERING True STAMP.USE_SAM True "
    "STAMP.LOSS_LOGIT_SCALE 100.0 STAMP.FILTER_ENTROPY_EPS 1.0e-5 DATA_DIR /data": Refused(PAPER_DATA),
    # docs/adacontrast.md
    "python test_time.py --cfg conf/cifar10_c/adacontrast.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar100_c/adacontrast.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/imagenet_c/adacontrast.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg tests/data/authors_configs/anchor/cifar10_c/adacontrast.yaml MODEL.ARCH ViT-B-16 "
    "DATA_DIR /data": Refused(PAPER_DATA),
    # docs/bn_variants.md, docs/memo_ttaug.md
    "python test_time.py --cfg conf/cifar10_c/bnalpha.yaml DATA_DIR /data": Refused(RN50_PAPER_DATA),
    "python test_time.py --cfg conf/imagenet_c/bnema.yaml DATA_DIR /data": Refused(RN50_PAPER_DATA),
    "python test_time.py --cfg tests/data/authors_configs/anchor/cifar10_c/norm_test.yaml MODEL.ARCH RN50 "
    "DATA_DIR /data": Refused(RN50_PAPER_DATA),
    "python test_time.py --cfg conf/cifar10_c/memo.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg conf/imagenet_c/ttaug.yaml DATA_DIR /data": Refused(PAPER_DATA),
    "python test_time.py --cfg tests/data/authors_configs/anchor/cifar10_c/memo.yaml MODEL.ARCH ViT-B-16 "
    "DATA_DIR /data": Refused(PAPER_DATA),
    # docs/eata.md
    "python test_time.py --cfg conf/cifar10_c/eata.yaml DATA_DIR /data": Refused(EATA_SOURCE),
    "python test_time.py --cfg conf/cifar10_c/eata.yaml DATA_DIR /data EATA.FISHER_ALPHA 0": Refused(PAPER_DATA),
    "python test_time.py --cfg tests/data/authors_configs/anchor/cifar10_c/eata.yaml MODEL.ARCH ViT-B-16 "
    "DATA_DIR /data": Refused(EATA_SOURCE),
    # the docstrings of test_time.py, scripts/compare.py, scripts/grid.py
    "python scripts/compare.py --cfg conf/cifar10_c/source.yaml --methods source tent --orders 10 DATA_DIR /data":
        Refused(PAPER_DATA),
    "python test_time.py --cfg conf/cifar10_c/source.yaml DATA_DIR /data MODEL.WEIGHTS openai": Refused(PAPER_DATA),
    "python scripts/compare.py --merge host1/results.json host2/results.json --out merged/":
        Refused(r"host1/results.json"),
    "python scripts/grid.py run grids/paper_main.yaml --launcher slurm --partition gpu --timeout-min 240 DATA_DIR "
    "/data": Refused(NO_GPU_PARTITION, slurm=True),
}


# ------------------------------------------------------------------------------------------------ running them

@functools.cache
def _entry_point(script: str):
    spec = importlib.util.spec_from_file_location(f"documented_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _words(command: str) -> tuple[dict, list[str]]:
    """(the VAR=value assignments before it, the command's words)."""
    words = shlex.split(command, comments=True)
    env = {}
    while words and ASSIGNMENT.fullmatch(words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


def _in_process(command: str) -> bool:
    _, words = _words(command)
    return len(words) > 1 and words[0] in PYTHONS and words[1] in ENTRY_POINTS


def run_command(command: str, cwd: Path, monkeypatch, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``command`` run in ``cwd``: an entry point's main(argv) in this process, any
    other command in bash with ``python`` and ``.venv/bin/python`` replaced by this interpreter."""
    if not _in_process(command):
        shell = re.sub(r"(?<![\w./-])(\.venv/bin/python|python)(?=\s)", sys.executable, command)
        done = subprocess.run(["bash", "-c", shell], cwd=cwd, capture_output=True, text=True, timeout=300)
        return done.returncode, done.stdout, done.stderr
    env, words = _words(command)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    try:
        status = _entry_point(words[1]).main(words[2:])
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    out, err = capsys.readouterr()
    return status, out, err


def working_copy(folder: Path, shapes: Path | None = None) -> Path:
    """The checkout's tracked top-level files and folders linked into ``folder``: a command reads the suite's
    configs, grids and scripts there and writes its ./output there; ./data is ``shapes`` (or absent)."""
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    names = {line.split("/")[0] for line in listed.stdout.splitlines()} if listed.returncode == 0 else \
        {p.name for p in ROOT.iterdir() if p.name not in {".git", ".venv", ".pytest_cache", "output"}}
    folder.mkdir(parents=True, exist_ok=True)
    for name in sorted(names - {"data", "output"}):
        if (ROOT / name).exists():
            (folder / name).symlink_to(ROOT / name)
    if shapes is not None:
        (folder / "data").symlink_to(shapes)
    return folder


def check_outcome(command: str, outcome, status: int, out: str, err: str, cwd: Path) -> None:
    said = f"{command}\nexit status {status}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
    if isinstance(outcome, Refused):
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert status == 2 and len(lines) == 1, said
        assert re.search(outcome.names, lines[0][len("error: "):]), f"expected /{outcome.names}/ in the error\n{said}"
        return
    assert status == 0, said
    for printed in (outcome.printed,) if isinstance(outcome.printed, str) else outcome.printed:
        assert re.search(printed, out) or re.search(printed, err), f"expected /{printed}/ in its output\n{said}"
    for path in outcome.wrote:
        assert (cwd / path).is_file(), f"{path} not written\n{said}"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """A Shapes-C as scripts/demo.py writes it (random pixels), for the tiny grid's two corruptions."""
    data = tmp_path_factory.mktemp("shapes_data")
    write_cifar_c(data, ["gaussian_noise", "fog"], per_severity=400, num_classes=10, folder="Shapes-C")
    return data


def _runs_here(command: str, outcome) -> None:
    if "/data" in shlex.split(command) and Path("/data").exists():
        pytest.skip("this machine has a /data folder: the command would run the paper's experiments on it")
    if isinstance(outcome, Refused) and outcome.without_gpu and torch.cuda.is_available():
        pytest.skip("the expected refusal is that of a machine without a GPU")


# ------------------------------------------------------------------------------------------------ the tests

def test_every_documented_command_has_its_outcome_in_this_file():
    missing = {command: where for command, where in documented_commands().items() if command not in COMMANDS}
    assert not missing, ("commands in the docs without an expected outcome: add each to COMMANDS in "
                         "tests/test_documented_commands.py (Succeeds, Refused, RunElsewhere or Parsed):\n"
                         + "\n".join(f"  {command!r}   ({', '.join(where)})" for command, where in missing.items()))


def test_every_command_of_this_file_is_still_documented():
    gone = sorted(set(COMMANDS) - set(documented_commands()))
    assert not gone, ("entries of COMMANDS that no doc shows any more: remove them (or put the command back):\n"
                      + "\n".join(f"  {command!r}" for command in gone))


def test_the_extraction_finds_indented_fenced_continued_and_commented_commands():
    text = ("Intro:\n\n    python a.py --x 1   # a comment\n    name: not a command\n\n"
            "```bash\n# a comment line\npython b.py \\\n    --y \"a # b\"\n```\n\n```python\nimport os\n```\n"
            "    - a list's continuation\n")
    assert list(_commands_in(text, "t.md")) == [("python a.py --x 1", "t.md:3"),
                                                ('python b.py --y "a # b"', "t.md:8")]
    assert _in_process("CUDA_VISIBLE_DEVICES=1 python scripts/grid.py run g.yaml")
    assert not _in_process("bash scripts/slurm_local.sh start")


def test_the_extraction_finds_the_prose_s_inline_commands():
    text = ("Intro, then `python a.py --x 1` or\n`X=1 bash s.sh\n  stop`; names, not commands: `python`, `sinfo`,\n"
            "`test_time.py --restart`, `--cfg <its config>`, ``a `python b.py` c``.\n\n"
            "```python\nrun('`python c.py`')\n```\n\n    `python d.py` in an indented block\n\n"
            "Last: `pytest -m cuda`.\n")
    assert list(_commands_in(text, "t.md", inline=True)) == [
        ("python a.py --x 1", "t.md:1"), ("X=1 bash s.sh stop", "t.md:2"), ("pytest -m cuda", "t.md:12")]
    assert list(_commands_in(text, "t.md")) == []


@pytest.mark.parametrize("command", [c for c, o in COMMANDS.items() if isinstance(o, (Succeeds, Refused))
                                     and not o.slurm])
def test_documented_command(command, tmp_path, monkeypatch, capsys, shapes):
    outcome = COMMANDS[command]
    _runs_here(command, outcome)
    cwd = working_copy(tmp_path / "checkout", shapes if getattr(outcome, "shapes", False) else None)
    status, out, err = run_command(command, cwd, monkeypatch, capsys)
    check_outcome(command, outcome, status, out, err, cwd)


@pytest.mark.parametrize("command", [c for c, o in COMMANDS.items() if isinstance(o, RunElsewhere)])
def test_heavy_command_is_run_by_ci_or_a_test(command):
    outcome = COMMANDS[command]
    for file, text in outcome.proof:
        assert re.search(text, (ROOT / file).read_text(), re.M), f"{command}: {outcome.why}; but {file} has no /{text}/"


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("command", [c for c, o in COMMANDS.items() if isinstance(o, Parsed)])
def test_benchmark_command_parses(command, monkeypatch):
    words = shlex.split(command.strip("()").split(";")[-1])
    assert words[0] in PYTHONS, command
    if words[1] == "-m":
        assert (ROOT / (words[2].replace(".", "/") + ".py")).is_file(), command
        module, argv = importlib.import_module(words[2]), words[3:]
    else:
        assert (ROOT / words[1]).is_file(), command
        module, argv = _entry_point(words[1]), words[2:]
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        raise _Parsed(parse(parser, args, namespace))
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(_Parsed):
        module.main(argv)


@pytest.fixture(scope="module")
def slurm():
    if not sys.platform.startswith("linux"):
        pytest.skip(f"SLURM commands skipped: scripts/slurm_local.sh runs on Linux, not {sys.platform}")
    script = ["bash", str(ROOT / "scripts" / "slurm_local.sh")]
    was_up = subprocess.run(["bash", "-c", "scontrol ping"], capture_output=True, text=True).returncode == 0
    started = subprocess.run([*script, "start"], capture_output=True, text=True, timeout=180)
    if started.returncode != 0:
        reason = (started.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"SLURM commands skipped: `bash scripts/slurm_local.sh start` exited {started.returncode}: "
                    f"{reason}")
    yield
    if not was_up:
        subprocess.run([*script, "stop"], capture_output=True, timeout=60)


def test_slurm_commands_on_the_single_node_cluster(slurm, tmp_path, monkeypatch, capsys, shapes):
    """The docs' SLURM commands in their order, in one copy of the checkout (the tiny grid is submitted, then its
    status asked); then a job of the tiny grid is waited for until it is done, and the others are cancelled (the
    whole grid on this SLURM is tests/test_slurm.py's)."""
    cwd = working_copy(tmp_path / "checkout", shapes)
    for command, outcome in COMMANDS.items():
        if isinstance(outcome, (Succeeds, Refused)) and outcome.slurm:
            _runs_here(command, outcome)
            status, out, err = run_command(command, cwd, monkeypatch, capsys)
            check_outcome(command, outcome, status, out, err, cwd)
    monkeypatch.chdir(cwd)
    grid = grids.load_grid("grids/tiny.yaml")
    arrays = {record["scheduler_id"].split("_")[0] for record in launch.read_submissions(grid).values()}
    try:
        wait_until(lambda: any(s.state == "done" for s in grids.job_statuses(grid, launch.scheduler_states(grid))), 240,
                   "a job of the tiny grid to be done on SLURM")
        assert not any(s.state == "failed" for s in grids.job_statuses(grid, launch.scheduler_states(grid)))
    finally:
        subprocess.run(["scancel", *arrays], capture_output=True, timeout=60)
        wait_until(lambda: not subprocess.run(["squeue", "-h", "-j", ",".join(arrays)], capture_output=True,
                                              text=True).stdout.strip(), 60, "the cancelled jobs to leave the queue")
