"""`transformers-red push`: upload a merged student with a RED model card to the Hugging Face Hub."""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Sequence

from ..hub import HubPushError, build_model_card, check_student_folder, measure_student_speed, push_compressed
from . import SUBCOMMANDS
from .flags import normalise_flags

HELP = SUBCOMMANDS["push"]


def _use_timeouts(seconds: float) -> None:
    """huggingface_hub's shared HTTP client waits forever by default; this command owns its process, so it gives
    that client connect / read / write timeouts (a library call, `push_compressed`, leaves the client alone)."""
    try:
        from huggingface_hub import set_client_factory
        from huggingface_hub.utils._http import default_client_factory
    except ImportError:  # a huggingface_hub without a client factory: requests' own defaults apply
        return

    def factory():
        client = default_client_factory()
        client.timeout = type(client.timeout)(seconds)  # httpx's (or httpx2's) Timeout, whichever the hub uses
        return client

    set_client_factory(factory)


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `transformers-red push FOLDER REPO_ID` (the token comes from HF_TOKEN or `hf auth login`)."""
    parser = argparse.ArgumentParser(prog="transformers-red push", description=HELP)
    parser.add_argument("folder", help="Merged student folder (trainer.save_model / student.save_pretrained).")
    parser.add_argument("repo_id", help="Hub repository, e.g. user/smollm2-red-50.")
    parser.add_argument("--private", action="store_true", help="Create the repository private.")
    parser.add_argument("--teacher", default=None, help="Teacher hub id for base_model (default: recorded one).")
    parser.add_argument("--eval_results", default=None,
                        help="JSON: a list of {task, metric, value, ...} (`transformers-red eval --eval_results`) "
                             "or an `eval --output` file, for the card's model-index.")
    parser.add_argument("--datasets", nargs="*", default=None, help="Training dataset ids for the card.")
    parser.add_argument("--erank_text", default=None, help="What the eRank was measured on (for the card).")
    parser.add_argument("--license", default=None,
                        help="Licence id for the card, e.g. apache-2.0 (default: the teacher card's).")
    parser.add_argument("--language", nargs="*", default=None, help="Language codes for the card (default: the "
                                                                    "teacher card's).")
    parser.add_argument("--measure_speed", action="store_true",
                        help="Measure generation tokens/s of the student and the teacher here (loads both) and put "
                             "them on the card.")
    parser.add_argument("--commit_message", default="Upload RED-compressed student")
    parser.add_argument("--dry_run", action="store_true", help="Check the folder and print the card; no upload.")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="Seconds to wait for the Hub to connect or answer one request (default 60); a silent "
                             "endpoint then fails instead of hanging.")
    parser.add_argument("--allow_plain_model", action="store_true",
                        help="Publish a folder without red_summary.json (not a trainer export); the card says so.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Check a merged student folder and upload it with its RED model card."""
    args = build_parser().parse_args(normalise_flags(argv))
    _use_timeouts(args.timeout)
    results = json.loads(pathlib.Path(args.eval_results).read_text(encoding="utf-8")) if args.eval_results else None
    if isinstance(results, dict):  # `transformers-red eval --output` writes {"eval_results": [...], ...}
        if "eval_results" not in results:
            raise SystemExit(f"error: {args.eval_results} has no 'eval_results' list (write it with "
                             "`transformers-red eval ... --eval_results FILE`).")
        results = results["eval_results"]
    kwargs = dict(teacher_name_or_path=args.teacher, datasets=args.datasets, erank_text=args.erank_text,
                  license=args.license, language=args.language)
    try:
        if args.dry_run:
            check_student_folder(args.folder, args.allow_plain_model)
            if args.measure_speed:
                kwargs["speed"] = measure_student_speed(args.folder, args.teacher)
            print(build_model_card(args.folder, eval_results=results, model_name=args.repo_id, **kwargs))
            return 0
        url = push_compressed(args.folder, args.repo_id, private=args.private, commit_message=args.commit_message,
                              eval_results=results, allow_plain_model=args.allow_plain_model,
                              measure_speed=args.measure_speed, **kwargs)
    except (ValueError, HubPushError) as err:  # the library names its argument; say the flag here
        raise SystemExit(f"error: {err}".replace("pass allow_plain_model=True", "pass --allow_plain_model")) from err
    print(f"pushed {args.folder} to {url}")
    return 0
