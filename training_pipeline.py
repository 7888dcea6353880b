"""Stage 2: fine-tune Whisper on the features of stage 1, with WER checks along the way.

    python training_pipeline.py                             # config.yaml; resumes a killed run
    python training_pipeline.py --fresh                     # start the run over
    python training_pipeline.py --set model.name_or_path=openai/whisper-tiny --set training.max_steps=200
    torchrun --nproc_per_node 4 training_pipeline.py        # data-parallel on 4 GPUs

Outputs go to <training.output_dir>/<training.run_name>/ (see docs/training.md).
"""

from __future__ import annotations

import sys

from whisper_ft import cli
from whisper_ft.train import is_main_process, run_training


def parse_args(argv: list[str] | None):
    parser = cli.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="delete this run's checkpoints and start over")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = cli.config_from_args(args)
    summary = run_training(cfg, fresh=args.fresh)
    if is_main_process():
        base = summary["baseline"]
        print(f"done: {summary['steps']} steps; best {summary['selection_split']} WER {_pct(summary['best_wer'])} at step "
              f"{summary['best_step']}; test split ({summary['eval_clips']} clips): WER {_pct(summary['wer'])} "
              f"(zero-shot {_pct(base and base['wer'])}), normalized {_pct(summary['wer_normalized'])}, "
              f"CER {_pct(summary['cer'])}")
        print(f"best model: {summary['run_dir']}/best")
    return 0


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


if __name__ == "__main__":
    sys.exit(cli.run(main))
