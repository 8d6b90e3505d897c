"""The ``l2l`` command line (also ``python -m l2l_ray``).

    l2l data synth --out data --images 2000 --seed 0
    l2l data stats --root data --dataset synthref --split-by unc
    l2l priors --config configs/synthetic.yaml
    l2l train  --config configs/synthetic.yaml method=supervised data.label_ratio=0.05
    l2l eval   --run runs/default [--split val]
    l2l tune   --config configs/tune/synthetic.yaml
    l2l report runs/default
    l2l config --keys

Every command that takes ``--config`` also takes dotted ``key=value`` overrides. Errors go to
stderr with exit code 2, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from l2l_ray.config import ConfigError, all_keys, load_config


class UserError(Exception):
    """Bad input from the user (file, id, value): printed as one line, exit code 2."""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config under configs/ (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.label_ratio=0.05")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="l2l", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="make the synthetic dataset or print stats of a REFER root")
    dsub = data.add_subparsers(dest="data_command", required=True)
    synth = dsub.add_parser("synth", help="write the built-in synthetic dataset in the REFER layout")
    synth.add_argument("--out", required=True, help="REFER root to write (<out>/synthref/...)")
    synth.add_argument("--images", type=int, default=2000)
    synth.add_argument("--seed", type=int, default=0)
    stats = dsub.add_parser("stats", help="print JSON stats (images, refs, sentences per split)")
    stats.add_argument("--root", required=True)
    stats.add_argument("--dataset", required=True)
    stats.add_argument("--split-by", required=True)
    stats.add_argument("--image-dir", default="")

    for name, help_ in [("priors", "make priors and soft proposals into the cache"),
                        ("train", "train (supervised warm-up, then the semi-supervised rounds)"),
                        ("tune", "Ray Tune search over config keys"),
                        ("experiment", "methods x label ratios x seeds -> docs/results.md")]:
        _add_config_args(sub.add_parser(name, help=help_))

    ev = sub.add_parser("eval", help="evaluate a run's last checkpoint on every split")
    ev.add_argument("--run", required=True, help="run folder")
    ev.add_argument("--split", default=None, help="one split (default: all)")

    rep = sub.add_parser("report", help="write an HTML report into the run folder")
    rep.add_argument("run_dir")

    cfg = sub.add_parser("config", help="print the resolved config or all keys")
    cfg.add_argument("--keys", action="store_true")
    _add_config_args(cfg)
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "data":
        from l2l_ray.data import commands

        return commands.synth(args) if args.data_command == "synth" else commands.stats(args)
    if args.command == "config":
        if args.keys:
            print("\n".join(all_keys()))
        else:
            import yaml

            print(yaml.safe_dump(load_config(args.config, args.overrides).to_dict(), sort_keys=False))
        return 0
    if args.command == "eval":
        from l2l_ray.train.commands import evaluate_run

        print(json.dumps(evaluate_run(args.run, args.split), indent=2))
        return 0
    if args.command == "report":
        from l2l_ray.report import write_report

        print(write_report(args.run_dir))
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.command == "priors":
        from l2l_ray.priors.pipeline import run_priors

        print(json.dumps(run_priors(cfg), indent=2))
    elif args.command == "train":
        from l2l_ray.driver import run

        run(cfg)
    elif args.command == "tune":
        from l2l_ray.tune import run_tune

        print(run_tune(cfg))
    elif args.command == "experiment":
        from l2l_ray.experiment import run_experiment

        print(run_experiment(cfg))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except (ConfigError, UserError, FileNotFoundError) as e:
        print(f"l2l: error: {e}", file=sys.stderr)
        return 2
