"""Progress of long work (harness/progress.py): a tqdm bar on a terminal; elsewhere a plain line at most once a
minute and a final one, never a carriage return; and the runs, comparisons and the demo show it."""
import io
import logging
import re
import sys
from pathlib import Path

from harness.logs import console_logging
from harness.progress import Progress, duration
from tests.synthetic import write_cifar_c

REPO = Path(__file__).resolve().parent.parent
TINY = ["MODEL.ARCH", "tiny-clip-test", "MODEL.WEIGHTS", "none", "TEST.NUM_WORKERS", "0", "DEVICE", "cpu"]


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_at_most_one_a_minute_then_the_final_one_with_counts_and_eta():
    clock, out = FakeClock(), io.StringIO()
    with Progress(30000, "tent", stream=out, clock=clock) as bar:
        for _ in range(300):            # 100 images every 2 s: 10 minutes in all
            clock.now += 2
            bar.update(100)
            if bar.count == 12000:
                bar.set_postfix_str("fog@5")
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 10 + 1         # one a minute (the tenth at 600 s, the last update), then the final one
    first = re.sub(r"^\[\d\d:\d\d:\d\d\] ", "", lines[0])
    assert first == "tent: 3000/30000 images, 10%, 1 min 0 s elapsed, ETA 9 min 0 s"
    assert lines[4].endswith("tent: 15000/30000 images, 50%, 5 min 0 s elapsed, ETA 5 min 0 s; fog@5")
    assert lines[-1].endswith("tent: 30000/30000 images, 100%, done in 10 min 0 s; fog@5")


def test_plain_lines_a_short_run_writes_only_its_final_line_and_a_stopped_one_says_so():
    clock, out = FakeClock(), io.StringIO()
    with Progress(64, "[1/2] source", stream=out, clock=clock) as bar:
        clock.now += 5
        bar.update(64)
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] \[1/2\] source: 64/64 images, 100%, done in 5 s\n", out.getvalue())
    out = io.StringIO()
    try:
        with Progress(4, "grid", unit="jobs", stream=out, clock=clock) as bar:
            bar.update_to(1)
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert out.getvalue().rstrip().endswith("grid: 1/4 jobs, 25%, stopped after 0 s")


def test_disabled_progress_writes_nothing():
    out = Terminal()
    with Progress(10, "x", stream=out, enabled=False) as bar:
        bar.update(10)
    assert out.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar_of_the_total_and_log_records_above_it():
    out = Terminal()
    handler = console_logging()
    handler.setStream(out)
    try:
        with Progress(32, "tent on cifar10_c", stream=out) as bar:
            bar.update(8)
            logging.getLogger("tta").info("fog severity 5: accuracy 50.00%")
            bar.update(24)
        assert handler.stream is out            # the console handler writes to the terminal again
    finally:
        logging.getLogger().removeHandler(handler)
    text = out.getvalue()
    assert "tent on cifar10_c" in text and "32/32" in text and "img" in text and "\r" in text
    assert "fog severity 5: accuracy 50.00%\n" in text


def test_durations():
    assert [duration(s) for s in (0, 59.4, 61, 3599, 3600, 7322)] == ["0 s", "59 s", "1 min 1 s", "59 min 59 s",
                                                                     "1 h 0 min", "2 h 2 min"]


def test_the_grid_wait_counts_the_jobs_that_ended(capsys):
    from harness import launch

    class Handle:                      # done at its third poll
        polls = 0

        def done(self):
            self.polls += 1
            return self.polls >= 3
    counts = [(0, "2 running"), (1, "1 running")]
    launch.wait([Handle(), Handle()], lambda: counts.pop(0) if counts else (2, "1 failed"), 2, label="tiny",
                poll_s=0)
    err = capsys.readouterr().err
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] tiny: 2/2 jobs, 100%, done in 0 s; 1 failed\n", err)


def _compare_cli():
    import importlib.util
    spec = importlib.util.spec_from_file_location("compare_cli", REPO / "scripts" / "compare.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def test_a_comparison_shows_each_run_s_progress_named_by_its_method(tmp_path, capsys, monkeypatch):
    write_cifar_c(tmp_path / "data", ["gaussian_noise", "fog"], per_severity=8)
    argv = ["--cfg", "conf/cifar10_c/source.yaml", "--methods", "source", "tent", "--figure", "none", "--out",
            str(tmp_path / "cmp"), *TINY, "DATA_DIR", str(tmp_path / "data"), "SAVE_DIR", str(tmp_path / "out"),
            "CORRUPTION.TYPE", "['gaussian_noise', 'fog']", "TEST.BATCH_SIZE", "4"]
    assert _compare_cli().main(argv) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert re.search(r"\[1/2\] source: 16/16 images, 100%, done in \d+ s\n", err)
    assert re.search(r"\[2/2\] tent: 16/16 images, 100%, done in \d+ s\n", err)
    # on a terminal, a bar of each run's images
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert _compare_cli().main(argv + ["--restart"]) == 0
    assert "[1/2] source" in terminal.getvalue() and "16/16" in terminal.getvalue()


def test_the_demo_shows_the_generation_s_and_each_method_s_progress(tmp_path, capsys, monkeypatch):
    sys.path.insert(0, str(REPO / "scripts"))
    import demo
    monkeypatch.chdir(tmp_path)
    argv = ["--data-dir", str(tmp_path / "data"), "--save-dir", str(tmp_path / "out"), "--corruptions", "fog",
            "--num-ex", "10", "--images-per-severity", "10", "--batch-size", "5", "--methods", "source", "tent"]
    assert demo.main(argv) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert re.search(r"generating Shapes-C: 10/10 images, 100%, done in \d+ s", err)
    assert re.search(r"\[1/2\] source: 10/10 images, 100%, done in \d+ s\n", err)
    assert re.search(r"\[2/2\] tent: 10/10 images, 100%, done in \d+ s\n", err)
    assert demo.main(argv + ["--no-progress"]) == 0
    assert "done in" not in capsys.readouterr().err
