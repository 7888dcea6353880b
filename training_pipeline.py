"""Stage 2: fine-tune Whisper on the features of stage 1, with WER checks along the way.

    python training_pipeline.py                             # config.yaml; resumes a killed run
    python training_pipeline.py --fresh                     # start the run over
    python training_pipeline.py --set model.name_or_path=openai/whisper-tiny --set training.max_steps=200
    torchrun --nproc_per_node 4 training_pipeline.py        # data-parallel on 4 GPUs
    python training_pipeline.py --push-to-hub USER/NAME [--private]   # then publish best/ on the Hugging Face Hub
    python training_pipeline.py --push-to-hub USER/NAME --push-only   # publish the finished run, no training

Outputs go to <training.output_dir>/<training.run_name>/ (see docs/training.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

from whisper_ft import cli, hub, report
from whisper_ft.processes import is_main_process
from whisper_ft.train import run_dir_of, run_training


def parse_args(argv: list[str] | None):
    parser = cli.base_parser(cli.summary(__doc__))
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--fresh", action="store_true", help="delete this run's checkpoints and start over")
    what.add_argument("--push-only", action="store_true",
                      help="publish this run's finished best/ on the Hub without training (needs --push-to-hub)")
    parser.add_argument("--push-to-hub", metavar="USER/NAME",
                        help="after training, publish best/ and its model card as this Hub model repository "
                             "(default: training.push_to_hub; token: HF_TOKEN or hf auth login)")
    parser.add_argument("--private", action="store_true", help="make that repository private (training.hub_private)")
    args = parser.parse_args(argv)
    args.values = ([("training.push_to_hub", args.push_to_hub)] if args.push_to_hub else []) + \
        ([("training.hub_private", True)] if args.private else [])
    return args


def main(argv: list[str] | None = None) -> int:
    cli.refuse_native_windows("training_pipeline.py")
    args = parse_args(argv)
    cfg = cli.config_from_args(args)
    cli.warn_stage1_sets(args, f"this run trains on the store {cfg.features.name}")
    repo_id = cfg.training.push_to_hub
    if args.push_only and not repo_id:
        raise cli.UserError("--push-only needs --push-to-hub USER/NAME (or training.push_to_hub in the config)")
    if args.push_only:
        hub.finished_run(run_dir_of(cfg))  # a run that is not there is said before any call to the Hub
    hub_token = None
    if repo_id and is_main_process():  # no token or no Hub fails now, not after hours of training
        hub_token = hub.token()
        hub.check_access(hub_token, repo_id)
    if not args.push_only:
        summary = run_training(cfg, fresh=args.fresh)
        if is_main_process():
            print_summary(summary)
    if repo_id and is_main_process():
        publish(cfg, hub_token, after_training=not args.push_only)
    return 0


def print_summary(summary: dict) -> None:
    base, metric = summary["baseline"], summary.get("select_metric", "wer")
    chosen = "" if metric == "wer" else f" (chosen by {report.METRIC_NAMES[metric]}: {_pct(summary['best_score'])})"
    print(f"done: {summary['steps']} steps; best {summary['selection_split']} WER {_pct(summary['best_wer'])} at step "
          f"{summary['best_step']}{chosen}; test split ({summary['eval_clips']} clips): WER {_pct(summary['wer'])} "
          f"(zero-shot {_pct(base and base['wer'])}), normalized {_pct(summary['wer_normalized'])}, "
          f"CER {_pct(summary['cer'])}{report.score_caveat(summary)}")
    print(f"best model: {Path(summary['run_dir']).absolute() / 'best'}")


def publish(cfg, hub_token: str | None, after_training: bool) -> None:
    """Push the run's best/ to training.push_to_hub; a failure after training says how to retry the upload alone."""
    run_dir = run_dir_of(cfg)
    try:
        url = hub.push(run_dir, cfg.training.push_to_hub, cfg.training.hub_private, hub_token)
    except hub.HubError as e:
        if not after_training:
            raise
        raise hub.HubError(f"{e}. Training is complete in {run_dir}: rerun the same command with --push-only to "
                           "retry the upload alone") from e
    print(f"published {run_dir}/best: {url}")


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


if __name__ == "__main__":
    sys.exit(cli.run(main))
