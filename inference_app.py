"""Stage 3: a web page that transcribes Swedish speech (microphone, file upload or video URL)
and translates it.

    python inference_app.py                           # newest checkpoints/<run>/best, else the base model
    python inference_app.py --model checkpoints/<run>/best --port 7860
    python inference_app.py --host 0.0.0.0            # reachable from the network
    python inference_app.py --share                   # public gradio.live link (only on request)
    python inference_app.py --share --auth-file FILE  # ... with a login (USER:PASSWORD lines; or $WHISPER_APP_AUTH)
    python inference_app.py --export-space DIR --model USER/NAME   # write a Hugging Face Space (README: Publish)

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
    parser = cli.base_parser(cli.summary(__doc__))
    parser.add_argument("--model", help="Whisper model folder or hub id (default: app.model, else the newest "
                                        "best checkpoint under training.output_dir, else model.name_or_path)")
    parser.add_argument("--host", help="address to bind (default: app.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: app.port, 7860)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto (the GPU when torch sees one; default: "
                                         "app.device, cpu)")
    parser.add_argument("--share", action="store_true", help="also publish a public gradio.live link")
    parser.add_argument("--auth", metavar="USER:PASSWORD",
                        help="ask visitors for this login (seen in the process list: prefer --auth-file or "
                             "$WHISPER_APP_AUTH)")
    parser.add_argument("--auth-file", metavar="PATH",
                        help="ask visitors for a login from this file of USER:PASSWORD lines (default: app.auth_file)")
    parser.add_argument("--export-space", metavar="DIR", type=cli.path_arg,
                        help="write a folder that runs this page as a Hugging Face Space (for --model), then exit")
    args = parser.parse_args(argv)
    if args.auth_file == "":  # `--auth-file "$LOGINS"` with the variable unset; app.auth_file's "" means no login
        raise cli.UserError("--auth-file: expected the path of a file of USER:PASSWORD lines, got an empty value")
    args.values = [(f"app.{key}", getattr(args, key)) for key in ("model", "host", "port", "device", "auth_file")
                   if getattr(args, key) is not None] + ([("app.share", True)] if args.share else [])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = cli.config_from_args(args)
    if args.export_space:
        from whisper_ft import space

        print(f"wrote the Space to {space.export(args.export_space, cfg)}")
        return 0
    from whisper_ft.transcribe import app_device, load_app_transcriber

    device = app_device(cfg.app.device)  # a GPU torch does not see is refused before the page's slow imports
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from whisper_ft.app import Handlers, build_app, exposure_warning, find_model, read_logins, serve

    logins = read_logins(args.auth, cfg.app.auth_file, os.environ)
    if warning := exposure_warning(cfg.app, logins):
        log.warning(warning)
    if cfg.app.cookies_file and not Path(cfg.app.cookies_file).is_file():
        raise cli.UserError(f"app.cookies_file: {cfg.app.cookies_file} does not exist")
    choice = find_model(cfg)
    if choice.notice:
        log.warning(choice.notice.replace("*", "").replace("`", ""))
    log.info("loading %s", choice.path)
    transcriber = load_app_transcriber(choice.path, cfg, device)
    demo = build_app(Handlers(transcriber, cfg), choice.path, choice.notice)
    serve(demo, cfg.app, logins)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main, interrupted="interrupted"))  # a page has no work to resume
