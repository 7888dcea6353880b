"""Search hyperparameters, fine-tuning variants or data mixes, one training run per trial.

Every trial gets the same budget of samples and the same evaluation set; a report compares them.

    python sweep.py sweeps/lr.yaml                     # runs or continues every trial
    python sweep.py sweeps/lr.yaml --set training.batch_size=8
    python sweep.py sweeps/lr.yaml --report-only       # rewrite report.md and wer.png
    python sweep.py sweeps/lr.yaml --retry-failed      # run the failed trials again (out of memory, ...)

Trials live in <training.output_dir>/sweeps/<name>/trial-NNN/; rerunning the same command
skips finished (and failed) trials and resumes a killed one.
"""

from __future__ import annotations

import sys

from whisper_ft import cli
from whisper_ft.processes import world_size
from whisper_ft.sweep import check_stores, check_trials, load_spec, report_only, run_sweep


def main(argv: list[str] | None = None) -> int:
    cli.refuse_native_windows("sweep.py")
    parser = cli.base_parser(cli.summary(__doc__))
    parser.add_argument("sweep", type=cli.path_arg, help="sweep file (YAML): method, space, budget; see sweeps/")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--report-only", action="store_true", help="only rewrite the report of finished trials")
    what.add_argument("--retry-failed", action="store_true",
                      help="first run each failed trial again, from the start, as a new trial with its settings")
    args = parser.parse_args(argv)
    if world_size() > 1:  # every process would run every trial, in one study
        raise cli.UserError("sweep.py runs its trials one after another in one process: start it with python, not "
                            "torchrun or accelerate launch")
    spec = load_spec(args.sweep)
    base = cli.config_from_args(args)
    cli.warn_stage1_sets(args, "every trial trains on its store")
    if args.report_only:
        report = report_only(spec, base, args.sweep)
    else:
        from whisper_ft.train import run_training

        check_stores(spec, check_trials(spec, base, args.config, args.overrides))
        report = run_sweep(spec, base, args.config, args.overrides, run_training,
                           retry_failed=args.retry_failed) / "report.md"
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
