"""Command-line tools: `python -m clip_service COMMAND`; `tag` for now, `--help` lists them.

Each command is a sub-parser with a `handler(args) -> exit code`; a new command adds one function
like `add_tag_command` below. Settings come from `.env` and the environment exactly as for the server.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from clip_service.engines.base import ModelLoadError
from clip_service.library import tagger
from clip_service.library.errors import LibraryError
from clip_service.library.walk import IMAGE_EXTENSIONS
from clip_service.ranges import parse_in_range
from clip_service.settings import Settings, SettingsError, load_settings
from clip_service.vocabulary.labels import LabelsError

PROG = "python -m clip_service"
EXIT_INTERRUPTED = 130  # what a shell reports for Ctrl-C

TAG_DESCRIPTION = """\
Label every image under FOLDER with the server's model, labels and settings (.env and the
environment; no server needed) and write one record per image, flushed as it is done.

Records: path (relative to FOLDER, with /), labels (best first), confidences, emoji (null/empty
where none is known). CSV joins each list with ';'. Folders and files whose names start with '.' are
skipped; unreadable or undecodable files are skipped with a warning and counted."""

TAG_EPILOG = """\
An existing output is never replaced silently: pass --resume to keep its records, tag only the files
it lacks and append (an unfinished last record left by an interrupted run is removed and redone), or
--overwrite to start again. Files that were skipped are tried again by --resume.

exit status: 0 done; 1 nothing could be tagged (every file failed, or none was found);
2 bad arguments, settings, folder or output file; 130 interrupted (Ctrl-C or SIGTERM).

example: python -m clip_service tag ~/Pictures -o pictures.csv --limit 5 --resume"""


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line, like the server's start-up errors."""

    def error(self, message: str):
        self.exit(2, f"clip-service: {message} (see {self.prog} --help)\n")


def threshold_arg(raw: str) -> float:
    try:
        return parse_in_range(raw, float, 0.0, 1.0)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def limit_arg(raw: str) -> int:
    try:
        return parse_in_range(raw, int, 1)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_tag_command(commands) -> None:
    parser = commands.add_parser(
        "tag", help="label every image in a folder tree into a JSON-lines or CSV file",
        description=TAG_DESCRIPTION, epilog=TAG_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, metavar="FOLDER", help="the folder tree to tag")
    parser.add_argument("-o", "--output", metavar="PATH",
                        help="file to write (default: tags.jsonl, or tags.csv with --format csv, in the "
                             "current folder); - for standard output")
    parser.add_argument("--format", choices=tagger.FORMATS,
                        help="jsonl or csv (default: csv when --output ends in .csv, else jsonl)")
    parser.add_argument("--threshold", type=threshold_arg, metavar="T",
                        help="lowest confidence kept, 0 to 1 (default: CLIP_CONFIDENCE_THRESHOLD)")
    parser.add_argument("--limit", type=limit_arg, metavar="N",
                        help="most labels per image, 1 or more (default: CLIP_MAX_PREDICTIONS)")
    parser.add_argument("--batch-size", type=limit_arg, metavar="N",
                        help="images per forward pass (default: 8 on a CPU, 64 on a GPU)")
    parser.add_argument("--all-files", action="store_true",
                        help="try every file, not only " + " ".join(sorted(IMAGE_EXTENSIONS)))
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true",
                          help="keep the output's records and tag only the files it lacks")
    existing.add_argument("--overwrite", action="store_true", help="empty an existing output first")
    parser.add_argument("--emoji-api", action="store_true",
                        help="ask the emoji API (API_HOST, API_PORT) once for its mappings; by default "
                             "only the local EMOJI_DICTIONARY is used")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bar or info messages (warnings and the summary remain); the "
                             "bar is also off when stderr is not a terminal")
    parser.set_defaults(handler=run_tag)


def tag_options(args: argparse.Namespace, settings: Settings) -> tagger.TagOptions:
    """Arguments over settings: --threshold and --limit default to the server's values."""
    fmt = args.format or ("csv" if args.output and args.output.lower().endswith(".csv") else "jsonl")
    output = args.output or f"tags.{fmt}"
    return tagger.TagOptions(
        folder=args.folder, output=None if output == "-" else Path(output), fmt=fmt,
        threshold=settings.confidence_threshold if args.threshold is None else args.threshold,
        limit=settings.max_predictions if args.limit is None else args.limit,
        all_files=args.all_files, resume=args.resume, overwrite=args.overwrite,
        progress=not args.quiet and sys.stderr.isatty(), batch_size=args.batch_size or 0)


def _say(message: str) -> None:
    print(f"clip-service: {message}", file=sys.stderr, flush=True)


def _terminate(signum, frame):
    """SIGTERM (kill) ends the run like Ctrl-C: the summary is printed, the output is whole."""
    raise KeyboardInterrupt


def run_tag(args: argparse.Namespace) -> int:
    logging.basicConfig(format="%(levelname)s: %(message)s")
    try:
        settings = load_settings()
    except SettingsError as error:
        _say(str(error))
        return 2
    logging.getLogger("clip_service").setLevel(logging.WARNING if args.quiet else settings.log_level)
    options = tag_options(args, settings)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        summary = tagger.run(options, settings, lambda: tagger.load_classifier(settings, args.emoji_api))
    except (LibraryError, SettingsError, LabelsError, ModelLoadError) as error:
        _say(str(error))
        return 2
    except KeyboardInterrupt:  # before any file was tagged, e.g. while the model loads
        _say("interrupted")
        return EXIT_INTERRUPTED
    except OSError as error:  # writing the output failed: disk full, a closed pipe
        _say(f"cannot write the output: {error}")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(summary.line(), file=sys.stderr, flush=True)
    if summary.interrupted:
        _say("interrupted; run the same command with --resume to continue")
        return EXIT_INTERRUPTED
    return summary.exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="clip-service command-line tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_tag_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)
