"""The folder tagger (`python -m clip_service tag`): records, formats, bad files, resume, the CLI."""

from __future__ import annotations

import csv
import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from clip_service import cli
from clip_service.library import tagger
from clip_service.library.errors import LibraryError as TaggerError
from clip_service.library.resume import scan_existing
from clip_service.library.tagger import TagOptions, build_classifier
from clip_service.library.walk import find_candidates
from tests.support.images import cat_photo, encode, quadrants
from tests.support.server import clean_environment
from tests.support.vocabulary import EMOJI, LABELS

ROOT = Path(__file__).resolve().parent.parent
ALL_LABELS = {label for labels in LABELS.values() for label in labels}
GOOD = ["cat.jpg", "quadrants.png", "sub/anim.gif", "sub/deeper/red.PNG"]  # sorted, as written
SUMMARY = re.compile(r"^tagged (\d+), skipped (\d+), already done (\d+) in [\d.]+ s \([\d.]+ images/s\)$",
                     re.MULTILINE)


class CountingClassifier:
    """The real classifier, counting classify calls; can stop the run like Ctrl-C after some."""

    def __init__(self, classifier, interrupt_at: int | None = None):
        self.classifier = classifier
        self.calls = 0  # images classified, alone or in batches
        self.batches: list[int] = []
        self.interrupt_at = interrupt_at

    def __getattr__(self, name):
        return getattr(self.classifier, name)

    def classify_prepared(self, inputs, threshold, limit):
        self.batches.append(len(inputs))
        for _ in inputs:
            self.calls += 1
            if self.calls == self.interrupt_at:
                raise KeyboardInterrupt
        return self.classifier.classify_prepared(inputs, threshold, limit)


@pytest.fixture
def real_classifier(settings, tiny_engine):
    return build_classifier(settings, tiny_engine, tagger.cli_emoji(settings))


@pytest.fixture
def classifier(real_classifier):
    return CountingClassifier(real_classifier)


@pytest.fixture
def photos(tmp_path) -> Path:
    """A small library: four images (one nested two deep), a corrupt .jpg, a .txt and hidden files."""
    folder = tmp_path / "photos"
    (folder / "sub" / "deeper").mkdir(parents=True)
    (folder / ".thumbnails").mkdir()
    (folder / "cat.jpg").write_bytes(encode(cat_photo(), "JPEG", quality=90))
    (folder / "quadrants.png").write_bytes(encode(quadrants(), "PNG"))
    (folder / "sub" / "anim.gif").write_bytes(encode(quadrants(40, 30), "GIF"))
    (folder / "sub" / "deeper" / "red.PNG").write_bytes(encode(quadrants(16, 16).convert("L"), "PNG"))
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".thumbnails" / "cat.jpg").write_bytes(encode(cat_photo(), "JPEG"))
    (folder / "._cat.jpg").write_bytes(b"macOS resource fork")
    return folder


def options(settings, folder, output, **overrides) -> TagOptions:
    fields = {"threshold": settings.confidence_threshold, "limit": settings.max_predictions, **overrides}
    return TagOptions(folder=folder, output=output, **fields)


def tag(settings, classifier, folder, output, **overrides) -> tagger.Summary:
    return tagger.run(options(settings, folder, output, **overrides), settings, lambda: classifier)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def counts(summary: tagger.Summary) -> tuple[int, int, int]:
    return summary.processed, summary.skipped, summary.done


# --- records -----------------------------------------------------------------------------------------


def test_jsonl_records_for_a_tree(settings, classifier, client, photos, tmp_path, caplog):
    output = tmp_path / "tags.jsonl"
    summary = tag(settings, classifier, photos, output)

    assert counts(summary) == (4, 1, 0) and not summary.interrupted and summary.exit_code == 0
    assert classifier.calls == 4
    assert "Skipped corrupt.jpg: The image could not be decoded" in caplog.text
    records = read_jsonl(output)
    assert [record["path"] for record in records] == GOOD
    for record in records:
        assert set(record) == {"path", "labels", "confidences", "emoji"}
        assert len(record["labels"]) == len(record["confidences"]) == len(record["emoji"]) == 10
        assert set(record["labels"]) == ALL_LABELS  # threshold 0, limit 10: every label
        assert record["confidences"] == sorted(record["confidences"], reverse=True)
        assert record["emoji"] == [EMOJI.get(label) for label in record["labels"]]  # astronaut: None

    # The tags the server gives for the same file (its own engine, from the same settings).
    served = client.post("/analyze", data={"file": ((photos / "cat.jpg").open("rb"), "cat.jpg")},
                         content_type="multipart/form-data").get_json()["predictions"]
    assert records[0]["labels"] == [prediction["label"] for prediction in served]
    assert records[0]["confidences"] == [prediction["confidence"] for prediction in served]


def test_threshold_and_limit(settings, classifier, photos, tmp_path):
    output = tmp_path / "tags.jsonl"
    tag(settings, classifier, photos, output, threshold=0.1, limit=3)
    for record in read_jsonl(output):
        assert len(record["labels"]) <= 3
        assert all(confidence >= 0.1 for confidence in record["confidences"])


def test_csv_matches_jsonl(settings, classifier, photos, tmp_path):
    tag(settings, classifier, photos, tmp_path / "tags.jsonl")
    tag(settings, classifier, photos, tmp_path / "tags.csv", fmt="csv")

    with open(tmp_path / "tags.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "labels", "confidences", "emoji"]
    for row, record in zip(rows, read_jsonl(tmp_path / "tags.jsonl"), strict=True):
        assert row["path"] == record["path"]
        assert row["labels"].split(";") == record["labels"]
        assert [float(value) for value in row["confidences"].split(";")] == record["confidences"]
        assert row["emoji"].split(";") == [emoji or "" for emoji in record["emoji"]]


def test_all_files_tries_everything_but_hidden_and_the_output(settings, classifier, photos, caplog):
    output = photos / "tags.jsonl"  # inside the folder: never tagged itself
    summary = tag(settings, classifier, photos, output, all_files=True)

    assert counts(summary) == (4, 2, 0)
    assert "Skipped notes.txt" in caplog.text and "Skipped tags.jsonl" not in caplog.text
    assert [record["path"] for record in read_jsonl(output)] == GOOD


def test_find_candidates_order_and_filters(photos):
    found = [path.as_posix() for path in find_candidates(photos)]
    assert found == ["cat.jpg", "corrupt.jpg", "quadrants.png", "sub/anim.gif", "sub/deeper/red.PNG"]


def test_find_candidates_walks_any_depth_and_enters_no_linked_or_hidden_folder(tmp_path):
    """A tree deeper than the stack allows: Python 3.11's os.walk recursed once per folder, so 1,100
    folders ended a run with RecursionError. Shown with 400 folders under a lowered recursion limit,
    so nothing this deep is left for a recursive clean-up (pytest's own) to trip over."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "loop").symlink_to(folder)  # a link up the tree: listed nowhere, never entered
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "y.png").write_bytes(b"")
    deep = folder
    limit = sys.getrecursionlimit()
    try:
        for _ in range(400):
            deep = deep / "a"
            deep.mkdir()
        (deep / "x.png").write_bytes(b"")
        (folder / "linked.png").symlink_to(deep / "x.png")
        sys.setrecursionlimit(len(inspect.stack()) + 200)
        found = [path.as_posix() for path in find_candidates(folder)]
    finally:
        sys.setrecursionlimit(limit)
        (deep / "x.png").unlink(missing_ok=True)
        while deep != folder:
            deep.rmdir()
            deep = deep.parent
    assert found == ["a/" * 400 + "x.png", "linked.png"]


def test_file_name_that_is_not_utf8_round_trips(settings, classifier, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9.png")
    try:
        (folder / name).write_bytes(encode(quadrants(), "PNG"))
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    output = tmp_path / "tags.jsonl"
    assert counts(tag(settings, classifier, folder, output)) == (1, 0, 0)
    assert b'"path": "caf\xe9.png"' in output.read_bytes()
    assert counts(tag(settings, classifier, folder, output, resume=True)) == (0, 0, 1)


def test_nothing_taggable_is_exit_code_1(settings, classifier, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert tag(settings, classifier, folder, tmp_path / "a.jsonl").exit_code == 1
    (folder / "broken.png").unlink()
    empty = tagger.run(options(settings, folder, tmp_path / "b.jsonl"), settings,
                       lambda: pytest.fail("the model was loaded for an empty folder"))
    assert counts(empty) == (0, 0, 0) and empty.exit_code == 1


# --- existing output and resume ----------------------------------------------------------------------


def test_existing_output_needs_resume_or_overwrite(settings, classifier, photos, tmp_path):
    output = tmp_path / "tags.jsonl"
    output.write_text("precious\n")
    with pytest.raises(TaggerError, match="--resume .* --overwrite"):
        tag(settings, classifier, photos, output)
    assert output.read_text() == "precious\n"

    assert counts(tag(settings, classifier, photos, output, overwrite=True)) == (4, 1, 0)
    assert [record["path"] for record in read_jsonl(output)] == GOOD


def test_resume_tags_only_what_is_missing(settings, real_classifier, photos, tmp_path, caplog):
    output = tmp_path / "tags.jsonl"
    tag(settings, real_classifier, photos, output)
    lines = output.read_text(encoding="utf-8").splitlines(keepends=True)
    # Drop quadrants.png's record, and cut the last one (red.PNG) off mid-line, as a kill would.
    output.write_text(lines[0] + lines[2] + lines[3][:25], encoding="utf-8")

    classifier = CountingClassifier(real_classifier)
    summary = tag(settings, classifier, photos, output, resume=True)

    assert classifier.calls == 2
    assert counts(summary) == (2, 1, 2)
    assert "unfinished record" in caplog.text
    records = read_jsonl(output)  # every line whole JSON again
    assert sorted(record["path"] for record in records) == GOOD

    again = CountingClassifier(real_classifier)
    assert counts(tag(settings, again, photos, output, resume=True)) == (0, 1, 4)
    assert again.calls == 0  # only the corrupt file is tried again


def test_finished_library_loads_no_model(settings, classifier, photos, tmp_path):
    output = tmp_path / "tags.jsonl"
    (photos / "corrupt.jpg").unlink()
    tag(settings, classifier, photos, output)
    summary = tagger.run(options(settings, photos, output, resume=True), settings,
                         lambda: pytest.fail("the model was loaded with nothing to tag"))
    assert counts(summary) == (0, 0, 4) and summary.exit_code == 0


def test_interrupted_run_keeps_finished_records_and_resumes(settings, real_classifier, photos, tmp_path):
    output = tmp_path / "tags.jsonl"
    stopping = CountingClassifier(real_classifier, interrupt_at=3)
    summary = tag(settings, stopping, photos, output, batch_size=1)
    assert summary.interrupted and counts(summary) == (2, 1, 0)
    assert [record["path"] for record in read_jsonl(output)] == GOOD[:2]

    classifier = CountingClassifier(real_classifier)
    assert counts(tag(settings, classifier, photos, output, resume=True)) == (2, 1, 2)
    assert [record["path"] for record in read_jsonl(output)] == GOOD


def test_resume_csv_with_a_truncated_row(settings, real_classifier, photos, tmp_path):
    output = tmp_path / "tags.csv"
    tag(settings, real_classifier, photos, output, fmt="csv")
    text = output.read_text(encoding="utf-8")
    output.write_text(text[:-30], encoding="utf-8", newline="")

    classifier = CountingClassifier(real_classifier)
    assert counts(tag(settings, classifier, photos, output, fmt="csv", resume=True)) == (1, 1, 3)
    with open(output, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle, strict=True))
    assert rows[0] == tagger.CSV_HEADER
    assert sorted(row[0] for row in rows[1:]) == GOOD


def test_resume_refuses_a_file_that_is_not_a_tagger_output(settings, classifier, photos, tmp_path):
    output = tmp_path / "tags.jsonl"
    tag(settings, classifier, photos, output)
    damaged = output.read_text(encoding="utf-8").replace("\n", "\nnot json\n", 1)
    output.write_text(damaged, encoding="utf-8")
    with pytest.raises(TaggerError, match="record 2 is not a jsonl tagger record"):
        tag(settings, classifier, photos, output, resume=True)
    assert output.read_text(encoding="utf-8") == damaged  # untouched

    with pytest.raises(TaggerError, match="CSV header"):
        tag(settings, classifier, photos, output, fmt="csv", resume=True)


@pytest.mark.parametrize(("text", "paths", "kept"), [
    ("", set(), 0),
    ('{"path": "a.jpg"}\n\n{"path": "b.jpg"}\n', {"a.jpg", "b.jpg"}, None),
    ('{"path": "a.jpg"}\n{"path": "b.j', {"a.jpg"}, 18),
    ('{"path": "a.jpg"}\n{"path": "b.jpg"}', {"a.jpg"}, 18),  # whole but unterminated: redone
    ('{"path": "a.jpg"}\n\x00\x00\x00', {"a.jpg"}, 18),  # the NUL tail a power cut can leave
])
def test_scan_jsonl(text, paths, kept):
    assert scan_existing(text, "jsonl") == (paths, len(text) if kept is None else kept)


def test_scan_csv_row_spanning_lines():
    header = tagger.csv_header()
    row = tagger.format_record({"path": "odd\nname.jpg", "labels": ["cat"], "confidences": [0.5],
                                "emoji": [None]}, "csv")
    assert scan_existing(header + row, "csv", tagger.CSV_HEADER) == ({"odd\nname.jpg"}, len(header + row))
    # Cut inside the quoted name, just after its line break: that row is unfinished.
    cut = header + row[:row.index("\n") + 1]
    assert scan_existing(cut, "csv", tagger.CSV_HEADER) == (set(), len(header))
    assert scan_existing(header[:10], "csv", tagger.CSV_HEADER) == (set(), 0)


# --- emoji -------------------------------------------------------------------------------------------


def test_emoji_api_is_asked_once_only_when_requested(settings, local_server, caplog):
    local_server.routes["/emoji_mappings.json"] = (200, {}, json.dumps({"astronaut": "🧑‍🚀"}).encode())
    settings = dataclasses.replace(settings, api_port=local_server.port)

    assert tagger.cli_emoji(settings).emoji_for("astronaut") is None
    assert local_server.hits == []
    mapper = tagger.cli_emoji(settings, use_api=True)
    assert mapper.emoji_for("astronaut") == "🧑‍🚀" and mapper.emoji_for("cat") == EMOJI["cat"]
    assert local_server.hits == ["/emoji_mappings.json"]

    down = tagger.cli_emoji(dataclasses.replace(settings, api_port=9), use_api=True)
    assert down.emoji_for("cat") == EMOJI["cat"] and "did not answer" in caplog.text


# --- the command line --------------------------------------------------------------------------------


@pytest.mark.parametrize("arguments", [
    ["tag"],
    ["tag", "x", "--threshold", "1.5"],
    ["tag", "x", "--threshold", "nan"],
    ["tag", "x", "--threshold", "high"],
    ["tag", "x", "--limit", "0"],
    ["tag", "x", "--limit", "2.5"],
    ["tag", "x", "--format", "xml"],
    ["tag", "x", "--resume", "--overwrite"],
    ["paint", "x"],
    [],
])
def test_bad_arguments_exit_2_with_one_line(arguments, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(arguments)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("clip-service: ") and error.count("\n") == 1


def test_cli_errors_exit_2(clean_env, photos, tmp_path, capsys):
    clean_env.chdir(tmp_path)
    assert cli.main(["tag", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err

    (tmp_path / "tags.jsonl").write_text("")
    assert cli.main(["tag", str(photos)]) == 2
    assert "pass --resume" in capsys.readouterr().err

    assert cli.main(["tag", str(photos), "-o", "-", "--resume"]) == 2
    assert "--resume needs an --output file" in capsys.readouterr().err

    clean_env.setenv("CLIP_CONFIDENCE_THRESHOLD", "2")
    assert cli.main(["tag", str(photos), "-o", "new.jsonl"]) == 2
    assert capsys.readouterr().err.startswith("clip-service: CLIP_CONFIDENCE_THRESHOLD=2 is out of range")


def test_cli_summary_exit_codes_and_defaults(clean_env, real_classifier, photos, tmp_path, capsys):
    clean_env.chdir(tmp_path)
    clean_env.setattr(tagger, "load_classifier", lambda settings, emoji_api=False: real_classifier)

    assert cli.main(["tag", str(photos), "--format", "csv", "--limit", "2"]) == 0
    assert SUMMARY.search(capsys.readouterr().err).groups() == ("4", "1", "0")
    with open(tmp_path / "tags.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert len(rows) == 5 and all(len(row[1].split(";")) <= 2 for row in rows[1:])

    assert cli.main(["tag", str(photos), "-o", "tags.csv", "--resume", "-q"]) == 0  # csv from the name
    assert SUMMARY.search(capsys.readouterr().err).groups() == ("0", "1", "4")

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"nope")
    assert cli.main(["tag", str(broken), "-o", "broken.jsonl"]) == 1
    assert SUMMARY.search(capsys.readouterr().err).groups() == ("0", "1", "0")


def test_cli_writes_to_stdout(clean_env, real_classifier, photos, capfd):
    clean_env.setattr(tagger, "load_classifier", lambda settings, emoji_api=False: real_classifier)
    assert cli.main(["tag", str(photos), "-o", "-", "-q"]) == 0
    captured = capfd.readouterr()
    assert [json.loads(line)["path"] for line in captured.out.splitlines()] == GOOD
    assert SUMMARY.search(captured.err)


def test_real_cli_in_a_subprocess(tiny_model_dir, labels_dir, emoji_file, photos, tmp_path):
    env = clean_environment({
        "CLIP_MODEL": f"local-dir:{tiny_model_dir}", "CLIP_LABELS_DIR": str(labels_dir),
        "CLIP_CACHE_DIR": str(tmp_path / "cache"), "EMOJI_DICTIONARY": str(emoji_file), "API_PORT": "9",
        "API_TIMEOUT": "0.2", "CLIP_DEVICE": "cpu", "PYTHONPATH": str(ROOT)})
    command = [sys.executable, "-m", "clip_service", "tag", str(photos), "--threshold", "0"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)

    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert SUMMARY.search(done.stderr).groups() == ("4", "1", "0")
    assert "Skipped corrupt.jpg" in done.stderr
    records = read_jsonl(tmp_path / "tags.jsonl")
    assert [record["path"] for record in records] == GOOD
    assert all(record["emoji"] == [EMOJI.get(label) for label in record["labels"]] for record in records)


def test_batches_give_the_same_records_as_one_at_a_time(settings, real_classifier, photos, tmp_path):
    one = tmp_path / "one.jsonl"
    tag(settings, real_classifier, photos, one, batch_size=1)
    batched = CountingClassifier(real_classifier)
    tag(settings, batched, photos, tmp_path / "batched.jsonl", batch_size=3)
    assert batched.batches == [3, 1]  # cat.jpg, quadrants.png, anim.gif in one pass; then red.PNG
    for a, b in zip(read_jsonl(one), read_jsonl(tmp_path / "batched.jsonl"), strict=True):
        assert a["path"] == b["path"] and a["labels"][:3] == b["labels"][:3]
        assert a["confidences"] == pytest.approx(b["confidences"], abs=0.003)


def test_an_interrupted_batch_is_tagged_again_on_resume(settings, real_classifier, photos, tmp_path):
    output = tmp_path / "tags.jsonl"
    stopping = CountingClassifier(real_classifier, interrupt_at=2)
    summary = tag(settings, stopping, photos, output, batch_size=4)
    assert summary.interrupted and summary.processed == 0
    assert counts(tag(settings, real_classifier, photos, output, resume=True)) == (4, 1, 0)


def test_csv_file_names_never_become_spreadsheet_formulas_and_resume_reads_them_back(
        settings, classifier, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    names = ["=HYPERLINK(evil).png", "+1.png", "-cmd.png", "@SUM.png", "'quoted.png", "plain.png"]
    for name in names:
        (folder / name).write_bytes(encode(quadrants(), "PNG"))
    output = tmp_path / "tags.csv"
    assert counts(tag(settings, classifier, folder, output, fmt="csv"))[0] == len(names)
    with open(output, newline="", encoding="utf-8") as handle:
        cells = [row["path"] for row in csv.DictReader(handle)]
    assert sorted(cells) == sorted(f"'{name}" if name[0] in "=+-@'" else name for name in names)
    assert all(not cell.startswith(("=", "+", "-", "@")) for cell in cells)
    assert counts(tag(settings, classifier, folder, output, fmt="csv", resume=True)) == (0, 0, len(names))
