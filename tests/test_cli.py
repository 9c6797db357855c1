"""test_time.py as a user runs it: a table of accuracy and error per corruption with the mean, results on disk,
and clear one-line errors (exit code 2) for bad input."""
import json
import logging

import pytest

import test_time
from tests.synthetic import TINY_OPTS, write_cifar_c

TINY = TINY_OPTS


def test_cli_prints_the_per_corruption_table_and_writes_results(tmp_path, caplog, capsys):
    write_cifar_c(tmp_path, ["gaussian_noise", "fog"], per_severity=6)
    argv = ["--cfg", "conf/cifar10_c/source.yaml", "--no-progress", *TINY, "DATA_DIR", str(tmp_path),
            "SAVE_DIR", str(tmp_path / "out"), "CORRUPTION.TYPE", "['gaussian_noise', 'fog']"]
    with caplog.at_level(logging.INFO):
        assert test_time.main(argv) == 0
    results = capsys.readouterr().out.strip().removeprefix("results: ")
    payload = json.loads(open(results).read())
    table = next(r.getMessage() for r in caplog.records if "acc %" in r.getMessage())
    for record in payload["records"]:
        line = next(line for line in table.splitlines() if line.startswith(record["domain"]))
        assert f"{100 * record['accuracy']:.2f}" in line and f"{100 * record['error']:.2f}" in line
    mean_line = next(line for line in table.splitlines() if line.startswith("mean"))
    assert f"{100 * payload['summary']['mean_accuracy']:.2f}" in mean_line


@pytest.mark.parametrize("extra, needle", [
    (["DATA_DIR", "/nonexistent/data"], "/nonexistent/data/CIFAR-10-C does not exist"),
    (["OPTIM.LRR", "1"], "Nearest valid keys"),
    (["MODEL.WEIGHTS", "/nonexistent/clip.pt"], "does not exist"),
])
def test_cli_bad_input_is_one_clear_error(tmp_path, capsys, extra, needle):
    argv = ["--cfg", "conf/cifar10_c/source.yaml", "--no-progress", *TINY, "SAVE_DIR", str(tmp_path), *extra]
    assert test_time.main(argv) == 2
    assert needle in capsys.readouterr().err


# ----------------------------------------------------------------------------- one line, before the model loads
@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if a run gets as far as loading a model."""
    import harness.run

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")
    monkeypatch.setattr(harness.run, "build_zero_shot_clip", refuse)


def one_error_line(capsys) -> str:
    """The error, one line and the last on stderr (log records may come before it), without a traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0] and not any("Traceback" in line for line in err), err
    return errors[0]


@pytest.mark.parametrize("cfg, extra, needle", [
    ("conf/cifar10_c/rpl.yaml", ["RPL.Q", "2.0"], "RPL.Q = 2.0: expected a number in (0, 1]"),
    ("conf/cifar10_c/sar.yaml", [], "SAR.EXCLUDED_DEEPEST_BLOCKS=3 exceeds the 2 blocks of MODEL.ARCH=tiny-clip-test"),
    ("conf/cifar10_c/tpt.yaml", ["TPT.N_CTX", "3"], "TPT.N_CTX = 3, but TPT.CTX_INIT 'a_photo_of_a' is 4 tokens"),
    ("conf/cifar10_c/tent.yaml", ["OPTIM.METHOD", "adam"], "OPTIM.METHOD = 'adam': expected one of ['Adam', "
                                                            "'AdamW', 'SGD'] (did you mean 'Adam'?)"),
    ("conf/cifar10_c/tent.yaml", ["OPTIM.LR", "-1"], "OPTIM.LR = -1.0: expected a number in [0, inf)"),
    ("conf/cifar10_c/tent.yaml", ["TEST.BATCH_SIZE", "0"], "TEST.BATCH_SIZE = 0: expected a number in [1, inf)"),
    ("conf/cifar10_c/tent.yaml", ["TEST.BATCH_SIZE", "1e2"],
     "TEST.BATCH_SIZE = '1e2' in the command-line overrides: expected an integer, got a number; write 100"),
    ("conf/cifar10_c/tent.yaml", ["CORRUPTION.TYPE", "fog"],
     "CORRUPTION.TYPE = 'fog' in the command-line overrides: expected a list, got a string"),
    ("conf/cifar10_c/tent.yaml", ["CORRUPTION.NUM_EX", "0"], "CORRUPTION.NUM_EX = 0: expected -1 (all images)"),
    ("conf/cifar10_c/tent.yaml", ["DEVICE", "cuda:x"], "DEVICE = 'cuda:x': expected 'auto', 'cpu', 'cuda'"),
    ("conf/cifar10_c/batclip.yaml", ["CLIP.PRECISION", "fp16"], "CLIP.PRECISION fp16 needs CUDA"),
])
def test_bad_values_are_one_line_before_the_model_loads_and_leave_nothing(tmp_path, capsys, no_model_loading, cfg,
                                                                          extra, needle):
    write_cifar_c(tmp_path / "data", ["gaussian_noise", "fog"], per_severity=4)
    argv = ["--cfg", cfg, "--no-progress", *TINY, "DATA_DIR", str(tmp_path / "data"),
            "SAVE_DIR", str(tmp_path / "out"), "CORRUPTION.TYPE", "[gaussian_noise, fog]", *extra]
    assert test_time.main(argv) == 2
    assert needle in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_every_domain_is_checked_before_the_model_loads(tmp_path, capsys, no_model_loading):
    write_cifar_c(tmp_path / "data", ["gaussian_noise"], per_severity=4)     # fog.npy is missing
    argv = ["--cfg", "conf/cifar10_c/tent.yaml", *TINY, "DATA_DIR", str(tmp_path / "data"),
            "SAVE_DIR", str(tmp_path / "out"), "CORRUPTION.TYPE", "['gaussian_noise', 'fog']"]
    assert test_time.main(argv) == 2
    assert "CIFAR-10-C/fog.npy" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  ADAPTATION: tent\n  ARCH: [ViT\n")
    assert test_time.main(["--cfg", str(bad)]) == 2
    line = one_error_line(capsys)
    assert str(bad) in line and "not valid YAML" in line and "line" in line


def test_flags_anywhere_and_yaml_style_lists(tmp_path, capsys):
    write_cifar_c(tmp_path / "data", ["gaussian_noise", "fog"], per_severity=4)
    out = tmp_path / "out"
    argv = ["--cfg", "conf/cifar10_c/source.yaml", *TINY, "DATA_DIR", str(tmp_path / "data"), "SAVE_DIR", str(out),
            "CORRUPTION.TYPE", "[gaussian_noise, fog]", "--no-progress", "--domains", "fog"]
    assert test_time.main(argv) == 0
    payload = json.loads(open(capsys.readouterr().out.strip().removeprefix("results: ")).read())
    assert [r["domain"] for r in payload["records"]] == ["fog"]
    assert payload["provenance"]["run_domains"] == ["fog"]
    assert test_time.main([*argv, "--restart"]) == 0          # a flag after everything else is still a flag


def test_error_during_a_run_is_one_line_and_goes_into_the_log(tmp_path, capsys):
    from tests.test_domainbed import write_pacs
    root = write_pacs(tmp_path / "data", per_class=1, domains=["photo"])
    # begins as a PNG (the plan's check of every file's first bytes passes it), fails when decoded
    (root / "photo" / "dog" / "img_000.png").write_bytes(b"\x89PNG\r\n\x1a\n but no image")
    for workers in ("0", "1"):                       # in-process, and inside a DataLoader worker
        argv = ["--cfg", "conf/pacs/source.yaml", "--no-progress", *TINY, "TEST.NUM_WORKERS", workers,
                "DATA_DIR", str(tmp_path / "data"), "SAVE_DIR", str(tmp_path / f"out{workers}"),
                "CORRUPTION.TYPE", "[photo]"]
        assert test_time.main(argv) == 2
        line = one_error_line(capsys)
        assert line.startswith("error: Cannot read image ") and "photo/dog/img_000.png" in line
        log = next((tmp_path / f"out{workers}").rglob("log.txt")).read_text()
        assert log.rstrip().splitlines()[-1].endswith(line)


def test_show_config_prints_the_composition(tmp_path, capsys):
    import yaml
    assert test_time.main(["--cfg", "conf/imagenet_c/tent.yaml", "--show-config", "OPTIM.STEPS", "2"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["CORRUPTION"]["DATASET"] == "imagenet_c" and shown["TEST"]["BATCH_SIZE"] == 64     # protocol
    assert (shown["MODEL"]["ADAPTATION"], shown["OPTIM"]["METHOD"], shown["OPTIM"]["LR"]) == ("tent", "SGD", 2.5e-4)
    assert shown["OPTIM"]["STEPS"] == 2                                                          # override


def test_show_config_leaves_out_other_methods_nodes_at_their_defaults(capsys):
    import yaml
    import methods
    from harness.build import load_cfg
    from harness.identity import flatten
    nodes = set(methods.declared_nodes())
    for config, own in (("conf/shapes_c/tent.yaml", set()), ("conf/shapes_c/batclip.yaml", {"BATCLIP"})):
        assert test_time.main(["--cfg", config, "--show-config"]) == 0
        printed = capsys.readouterr().out
        shown = yaml.safe_load(printed)
        cfg = load_cfg(config)
        suite = set(cfg) - nodes
        assert set(shown) == suite | own                       # the suite's keys and the method's own node only
        assert flatten(shown) == {k: v for k, v in flatten(yaml.safe_load(cfg.dump())).items()
                                  if k.split(".")[0] in suite | own}
        assert "TDA:" not in printed and ("BATCLIP:" in printed) == bool(own)
        last = printed.rstrip().splitlines()[-1]
        assert last.startswith("# not shown: ") and ("BATCLIP" in last.split("(")[0]) != bool(own)
    # another method's node set away from its defaults is shown, with the warning that the method ignores it
    assert test_time.main(["--cfg", "conf/shapes_c/tent.yaml", "--show-config", "TDA.POSITIVE_ALPHA", "3.0"]) == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["TDA"]["POSITIVE_ALPHA"] == 3.0 and "BATCLIP:" not in printed
    assert "# warning: TDA.POSITIVE_ALPHA set, but method tent does not read the TDA keys" in printed
