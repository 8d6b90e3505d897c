"""The ``l2l`` command line (also ``python -m l2l_ray``).

    l2l data synth --out data --images 2000 --seed 0
    l2l data stats --root data --dataset synthref --split-by unc [--check-images]
    l2l priors --config configs/synthetic.yaml
    l2l train  --config configs/synthetic.yaml method=supervised data.label_ratio=0.05
    l2l eval   --run runs/default [--split val]
    l2l tune   --config configs/tune/synthetic.yaml
    l2l report runs/default
    l2l config --keys

Every command that takes ``--config`` also takes dotted ``key=value`` overrides. Errors of the user's
input (``l2l_ray.errors``, also when a Ray task or Train worker raised them) go to stderr as their
message alone, exit code 2. Ctrl-C prints how to resume and exits 130.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from l2l_ray.config import all_keys, load_config
from l2l_ray.errors import USER_ERRORS

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C'd command


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
    stats.add_argument("--check-images", action="store_true",
                       help="decode every referenced image; name the unreadable ones (exit 2 if any)")

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
        from l2l_ray.commands import data

        return data.synth(args) if args.data_command == "synth" else data.stats(args)
    if args.command == "config":
        if args.keys:
            print("\n".join(all_keys()))
        else:
            import yaml

            print(yaml.safe_dump(load_config(args.config, args.overrides).to_dict(), sort_keys=False))
        return 0
    if args.command == "eval":
        from l2l_ray.commands.evaluate import evaluate_run

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


def user_error(e: BaseException) -> BaseException | None:
    """The error of the user's input that ``e`` is or wraps, else None (a bug: keep its traceback).

    Ray hands a task's or actor's exception back as a ``RayTaskError`` whose ``cause`` is the original
    (its class also derives from the original's, but its text is the remote traceback); Ray Train
    raises ``WorkerGroupError`` with ``worker_failures`` {rank: exception}. Both are unwrapped."""
    for _ in range(8):  # wrappers nest (a task error inside a Train worker's error); stop on a cycle
        cause = getattr(e, "cause", None)
        failures = getattr(e, "worker_failures", None)
        if isinstance(cause, BaseException):
            e = cause
        elif isinstance(failures, dict) and failures:
            e = next(iter(failures.values()))
        else:
            break
    return e if isinstance(e, USER_ERRORS) else None


def _resume_hint(args: argparse.Namespace, argv: list[str]) -> str:
    """One line for a Ctrl-C: how to continue where the command stopped."""
    if args.command not in ("train", "tune", "experiment"):
        return "l2l: interrupted"
    try:
        run = load_config(args.config, args.overrides).run
    except Exception:  # interrupted while loading it: the hint is best effort
        return "l2l: interrupted; to resume, run the same command again"
    again = shlex.join(["l2l", *argv, *([] if run.resume else ["run.resume=true"])])
    where = {"train": f"it continues from the last checkpoint in {run.dir}",
             "tune": f"it restores the search in {run.dir}/tune and resumes the unfinished trials",
             "experiment": f"runs that finished under {run.dir} are not run again"}[args.command]
    return f"l2l: interrupted; to resume, run the same command again ({again}): {where}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print(_resume_hint(args, argv), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as e:
        err = user_error(e)
        if err is None:
            raise
        print(f"l2l: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
