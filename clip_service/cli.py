"""Command-line tools: `python -m clip_service COMMAND` (tag, index, search); `--help` lists them.

Each command is a sub-parser with a `handler(args) -> exit code`; a new command adds one function
like `add_tag_command` below. Settings come from `.env` and the environment exactly as for the server.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from clip_service.engines.base import ModelLoadError
from clip_service.engines.registry import engine_for_settings
from clip_service.engines.spec import model_identity
from clip_service.inputs.images import ImageLimits
from clip_service.library import indexer, tagger
from clip_service.library.approximate import APPROXIMATE_FROM
from clip_service.library.batches import Summary
from clip_service.library.errors import LibraryError
from clip_service.library.photo_index import PhotoIndexError, read_model_index
from clip_service.library.pipeline import read_image
from clip_service.library.walk import IMAGE_EXTENSIONS
from clip_service.ranges import parse_in_range
from clip_service.settings import Settings, SettingsError, load_settings
from clip_service.tasks.search import DEFAULT_RESULTS, MAX_RESULTS, best_matches
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


INDEX_DESCRIPTION = """\
Embed every image under FOLDER with the server's model and settings (.env and the environment; no
server needed) into a photo index for `search` and the server's /search (SEARCH_INDEX=INDEX).

The index holds each image's CLIP embedding, its path relative to FOLDER, FOLDER itself and the
model's identity: it works only with the same CLIP_MODEL. Folders and files whose names start with '.'
are skipped; unreadable or undecodable files are skipped with a warning and counted."""

INDEX_EPILOG = """\
Finished batches are kept in INDEX.partial while the run goes on, so an interrupted run continues
with --resume. --resume on a finished index embeds only the images it lacks and drops those gone
from FOLDER; --overwrite starts again.

exit status: 0 done; 1 nothing could be indexed (every file failed, or none was found);
2 bad arguments, settings, folder or index; 130 interrupted (Ctrl-C or SIGTERM).

example: python -m clip_service index ~/Pictures -o pictures.clipindex --resume"""

SEARCH_DESCRIPTION = """\
The images of a photo index (made by `index`) that best match a description or look like a photo,
best first, with their cosine similarity to the query (higher is closer), using the server's model
and settings. The index must have been made with the same CLIP_MODEL."""

SEARCH_EPILOG = """\
exit status: 0 done; 2 bad arguments, settings, index or photo.

examples: python -m clip_service search pictures.clipindex "a dog on a beach" -k 5
          python -m clip_service search pictures.clipindex --like holiday.jpg --json
          python -m clip_service search pictures.clipindex "a dog" -0 | cut -z -f2 | xargs -0 ls -l"""


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
    parser.add_argument("--emoji-api", action="store_true",
                        help="ask the emoji API (API_HOST, API_PORT) once for its mappings; by default "
                             "only the local EMOJI_DICTIONARY is used")
    add_folder_walk_options(parser, resume="keep the output's records and tag only the files it lacks",
                            overwrite="empty an existing output first")
    add_ray_option(parser)
    parser.set_defaults(handler=run_tag)


def add_folder_walk_options(parser: argparse.ArgumentParser, resume: str, overwrite: str) -> None:
    """The options `tag` and `index` share: they walk a folder the same way (library/batches.py)."""
    parser.add_argument("--batch-size", type=limit_arg, metavar="N",
                        help="images per forward pass (default: 8 on a CPU, 64 on a GPU)")
    parser.add_argument("--all-files", action="store_true",
                        help="try every file, not only " + " ".join(sorted(IMAGE_EXTENSIONS)))
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help=resume)
    existing.add_argument("--overwrite", action="store_true", help=overwrite)
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bar or info messages (warnings and the summary remain); the "
                             "bar is also off when stderr is not a terminal")


def add_ray_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ray", metavar="ADDRESS",
                        help="run the model on a Ray cluster: auto (the cluster this machine joined with ray "
                             "start), ray://HOST:PORT, HOST:PORT, or local (start one here); every node "
                             "must see FOLDER at the same path (pip install -r requirements-cluster.txt)")
    parser.add_argument("--ray-engines", type=limit_arg, metavar="N", default=0,
                        help="with --ray: how many engines (actors) to run, spread over the nodes "
                             "(default: one per 4 CPUs of each node)")


def add_index_command(commands) -> None:
    parser = commands.add_parser(
        "index", help="embed every image in a folder tree into a photo index for search",
        description=INDEX_DESCRIPTION, epilog=INDEX_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, metavar="FOLDER", help="the folder tree to index")
    parser.add_argument("-o", "--output", type=Path, metavar="INDEX", required=True,
                        help="the index file to write, e.g. pictures.clipindex")
    add_folder_walk_options(
        parser, resume="keep what INDEX (or an interrupted run) holds and embed only what it lacks",
        overwrite="index FOLDER again from scratch")
    add_ray_option(parser)
    search_kind = parser.add_mutually_exclusive_group()
    search_kind.add_argument("--approximate", action="store_true", default=None,
                             help="also build an approximate (HNSW) index for fast search, about 1.2 KB "
                                  f"per image (default: from {APPROXIMATE_FROM:,} images on)")
    search_kind.add_argument("--exact", action="store_false", dest="approximate",
                             help="no approximate index: every search compares every image")
    parser.set_defaults(handler=run_index, approximate=None)


def results_arg(raw: str) -> int:
    try:
        return parse_in_range(raw, int, 1, MAX_RESULTS)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_search_command(commands) -> None:
    parser = commands.add_parser(
        "search", help="find the images of a photo index that match a description or a photo",
        description=SEARCH_DESCRIPTION, epilog=SEARCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("index", type=Path, metavar="INDEX", help="a photo index made by index")
    parser.add_argument("text", nargs="?", metavar="TEXT", help='what to look for, e.g. "a dog on a beach"')
    parser.add_argument("--like", type=Path, metavar="PHOTO", help="look for images like this photo instead")
    parser.add_argument("-k", type=results_arg, default=DEFAULT_RESULTS, metavar="N",
                        help=f"how many matches, 1 to {MAX_RESULTS} (default {DEFAULT_RESULTS})")
    parser.add_argument("--json", action="store_true",
                        help='print {"folder": ..., "matches": [{"path": ..., "score": ...}, ...]} '
                             "instead of lines")
    parser.add_argument("-0", "--null", action="store_true",
                        help="end each SCORE<tab>PATH with a NUL byte instead of a newline, the name "
                             "exactly as it is (for xargs -0); without it, control characters in names "
                             r"are shown as \xNN, so a name cannot start a line of its own")
    parser.add_argument("--exact", action="store_true",
                        help="compare every image even when the index has an approximate index (slower; "
                             "to check what it finds)")
    parser.set_defaults(handler=run_search)


def tag_options(args: argparse.Namespace, settings: Settings) -> tagger.TagOptions:
    """Arguments over settings: --threshold and --limit default to the server's values."""
    fmt = args.format or ("csv" if args.output and args.output.lower().endswith(".csv") else "jsonl")
    output = args.output or f"tags.{fmt}"
    return tagger.TagOptions(
        folder=args.folder, output=None if output == "-" else Path(output), fmt=fmt,
        threshold=settings.confidence_threshold if args.threshold is None else args.threshold,
        limit=settings.max_predictions if args.limit is None else args.limit,
        all_files=args.all_files, resume=args.resume, overwrite=args.overwrite,
        progress=not args.quiet and sys.stderr.isatty(), batch_size=args.batch_size or 0, ray=args.ray,
        ray_engines=args.ray_engines, emoji_api=args.emoji_api)


def _say(message: str) -> None:
    print(f"clip-service: {message}", file=sys.stderr, flush=True)


def _terminate(signum, frame):
    """SIGTERM (kill) ends the run like Ctrl-C: the summary is printed, the output is whole."""
    raise KeyboardInterrupt


def _settings_or_none(quiet: bool) -> Settings | None:
    logging.basicConfig(format="%(levelname)s: %(message)s")
    try:
        settings = load_settings()
    except SettingsError as error:
        _say(str(error))
        return None
    logging.getLogger("clip_service").setLevel(logging.WARNING if quiet else settings.log_level)
    return settings


def _run_library(quiet: bool, run: Callable[[Settings], Summary]) -> int:
    """A library run (tag, index) with its settings, summary line, exit status and SIGTERM handling."""
    settings = _settings_or_none(quiet)
    if settings is None:
        return 2
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        summary = run(settings)
    except (LibraryError, SettingsError, LabelsError, ModelLoadError) as error:
        _say(str(error))
        return 2
    except KeyboardInterrupt:  # before any file was done, e.g. while the model loads
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


def run_tag(args: argparse.Namespace) -> int:
    return _run_library(args.quiet, lambda settings: tagger.run(
        tag_options(args, settings), settings, lambda: tagger.load_classifier(settings, args.emoji_api)))


def run_index(args: argparse.Namespace) -> int:
    def run(settings: Settings) -> Summary:
        options = indexer.IndexOptions(
            folder=args.folder, output=args.output, all_files=args.all_files, resume=args.resume,
            overwrite=args.overwrite, progress=not args.quiet and sys.stderr.isatty(),
            batch_size=args.batch_size or 0, approximate=args.approximate, ray=args.ray,
            ray_engines=args.ray_engines)
        return indexer.run(options, settings, lambda: engine_for_settings(settings))

    return _run_library(args.quiet, run)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def without_control_characters(name: str) -> str:
    r"""A file name for a line of output: tabs, newlines and other control characters as \xNN, so a
    photo named "x\n0.9999\t/home/victim/keep.png" cannot add a line (or a field) of its own."""
    return _CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", name)


def run_search(args: argparse.Namespace) -> int:
    if (args.text is None) == (args.like is None):
        _say("give what to look for (TEXT) or --like PHOTO, one of them (see search --help)")
        return 2
    settings = _settings_or_none(quiet=True)
    if settings is None:
        return 2
    try:
        index = read_model_index(args.index, settings.clip_model, model_identity(settings.model_spec))
        engine = engine_for_settings(settings)
        if args.like is not None:
            limits = ImageLimits.of(settings)
            pixels, problem = read_image(args.like, limits, engine.input_size, prepare=engine.prepare)
            if pixels is None:
                _say(f"--like {args.like}: {problem}")
                return 2
            query = engine.encode_images(pixels.unsqueeze(0))[0]
        else:
            query = engine.encode_texts([args.text])[0]
    except (PhotoIndexError, SettingsError, ModelLoadError) as error:
        _say(str(error))
        return 2
    approximate = None if args.exact else index.approximate
    if args.json:  # JSON carries only UTF-8: names that are not are shown with their bytes as \xNN
        matches = best_matches(index.embeddings, index.shown_paths, query.numpy(), args.k, approximate)
        print(json.dumps({"folder": str(index.folder),
                          "matches": [{"path": match.path, "score": match.score} for match in matches]},
                         ensure_ascii=False))
    else:  # a line per file, for `cut -f2 | xargs ...`; with -0 its real name, byte for byte
        matches = best_matches(index.embeddings, index.paths, query.numpy(), args.k, approximate)
        if args.null:
            records = [f"{match.score:.4f}\t{index.folder / match.path}\0" for match in matches]
        else:
            records = [f"{match.score:.4f}\t{without_control_characters(str(index.folder / match.path))}\n"
                       for match in matches]
        sys.stdout.flush()
        sys.stdout.buffer.write("".join(records).encode("utf-8", "surrogateescape"))
        sys.stdout.buffer.flush()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="clip-service command-line tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_tag_command(commands)
    add_index_command(commands)
    add_search_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)
