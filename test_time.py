"""Run one test-time adaptation method on one benchmark.

    python test_time.py --cfg conf/cifar10_c/source.yaml DATA_DIR /data MODEL.WEIGHTS openai

Overrides follow yacs: KEY VALUE pairs, before or after the flags. An interrupted run resumes where it stopped
when the same command is run again (--restart starts over); --domains / --shard K/N run part of the domains, e.g.
on several machines (reset_each_shift only; see docs/comparison.md)."""
from __future__ import annotations

import argparse
import sys

from conf import ConfigError
from harness.build import LoadedConfig, build_plan, check_config, config_warnings, read_config
from harness.cli import entry_point, parse_command_line
from harness.identity import unread_default_nodes
from harness.logs import console_logging


def shard_domains(domains: list[str], shard: str) -> list[str]:
    """Domains of shard 'K/N' (K = 1..N): every N-th domain starting at the K-th."""
    try:
        k, n = (int(v) for v in shard.split("/"))
    except ValueError:
        raise ConfigError(f"--shard expects K/N with integers, e.g. 2/4; got '{shard}'") from None
    if not 1 <= k <= n:
        raise ConfigError(f"--shard K/N needs 1 <= K <= N; got '{shard}'")
    return list(domains)[k - 1::n]


def build_run_cfg(cfg_file, opts, restart: bool = False, domains=None, shard: str | None = None) -> LoadedConfig:
    """read_config plus the command-line flags that become RESUME / RUN_DOMAINS (checked by build_plan, or by
    --show-config)."""
    loaded = read_config(cfg_file, opts)
    cfg = loaded.cfg
    if restart:
        cfg.RESUME = False
    if domains and shard:
        raise ConfigError("give either --domains or --shard, not both")
    if domains:
        cfg.RUN_DOMAINS = list(domains)
    elif shard:
        cfg.RUN_DOMAINS = shard_domains(cfg.CORRUPTION.TYPE, shard)
    return loaded


def shown_config(cfg) -> str:
    """The config as YAML without the nodes of the other methods that hold their defaults: they cannot change this
    run's results and are left out of its identity too (harness.identity.unread_default_nodes). A node of another
    method set away from its defaults stays, and config_warnings says that the method does not read it."""
    left_out = unread_default_nodes(cfg)
    shown = cfg.clone()
    shown.defrost()
    for node in left_out:
        del shown[node]
    note = f"# not shown: {', '.join(sorted(left_out))} (other methods' keys, at their defaults)\n" if left_out else ""
    return shown.dump() + note


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true",
                        help="hide the progress (a bar on a terminal, else a line a minute and one at the end)")
    parser.add_argument("--restart", action="store_true",
                        help="start over instead of resuming finished tasks (RESUME False)")
    parser.add_argument("--domains", nargs="+", metavar="DOMAIN",
                        help="run only these domains of CORRUPTION.TYPE (RUN_DOMAINS)")
    parser.add_argument("--shard", metavar="K/N", help="run the K-th of N interleaved parts of CORRUPTION.TYPE")


@entry_point
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s --cfg CONFIG [flags] [KEY VALUE ...]")
    parser.add_argument("--cfg", dest="cfg_file", required=True, help="YAML config, e.g. conf/cifar10_c/batclip.yaml")
    add_run_flags(parser)
    parser.add_argument("--show-config", action="store_true",
                        help="print the config this command would run (composed, overrides applied; other methods' "
                             "keys only where set) and exit")
    args = parse_command_line(parser, argv)
    console_logging()
    loaded = build_run_cfg(args.cfg_file, args.opts, args.restart, args.domains, args.shard)
    if args.show_config:
        check_config(loaded.cfg)
        print(shown_config(loaded.cfg), end="")
        for warning in config_warnings(loaded.cfg, loaded.keys_set):
            print(f"# warning: {warning}")
        return 0
    from harness.run import evaluate     # deferred: torch and the models load for a run, not for --help
    plan = build_plan(loaded.cfg, loaded.keys_set)
    payload = evaluate(plan, progress=not args.no_progress)   # logs the per-domain table (and the paper's row)
    print(f"results: {payload['provenance']['save_dir']}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
