"""Stage 3: a web page that transcribes Swedish speech (microphone, file upload or video URL)
and translates it.

    python inference_app.py                           # newest checkpoints/<run>/best, else the base model
    python inference_app.py --model checkpoints/<run>/best --port 7860
    python inference_app.py --host 0.0.0.0            # reachable from the network
    python inference_app.py --share                   # public gradio.live link (only on request)

Settings live in the `app:` section of config.yaml (override with --set app.KEY=VALUE). Models
trained here carry a CTranslate2 export (best/ct2/), the fast CPU path; export any other
model folder with: python -m whisper_ft.ct2 MODEL_DIR
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from whisper_ft import cli

log = logging.getLogger("inference_app")


def parse_args(argv: list[str] | None):
    parser = cli.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", help="Whisper model folder or hub id (default: app.model, else the newest "
                                        "best checkpoint under training.output_dir, else model.name_or_path)")
    parser.add_argument("--host", help="address to bind (default: app.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: app.port, 7860)")
    parser.add_argument("--share", action="store_true", help="also publish a public gradio.live link")
    args = parser.parse_args(argv)
    for key in ("model", "host", "port"):
        if getattr(args, key) is not None:
            args.overrides.append(f"app.{key}={getattr(args, key)}")
    if args.share:
        args.overrides.append("app.share=true")
    return args


def main(argv: list[str] | None = None) -> int:
    cfg = cli.config_from_args(parse_args(argv))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from whisper_ft.app import Handlers, build_app, find_model, load_for_app

    if cfg.app.cookies_file and not Path(cfg.app.cookies_file).is_file():
        raise cli.UserError(f"app.cookies_file: {cfg.app.cookies_file} does not exist")
    choice = find_model(cfg)
    if choice.notice:
        log.warning(choice.notice.replace("*", "").replace("`", ""))
    log.info("loading %s", choice.path)
    transcriber = load_for_app(choice, cfg)
    demo = build_app(Handlers(transcriber, cfg), choice.path, choice.notice)
    demo.launch(server_name=cfg.app.host, server_port=cfg.app.port, share=cfg.app.share, max_file_size="1gb")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
