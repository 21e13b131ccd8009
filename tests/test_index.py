"""`index` and `search` on the command line (cli.py, library/indexer.py, library/photo_index.py,
library/batches.py, tasks/search.py).

The colour-trained model (tests/trained_clip.py) knows colours, so "a red circle" must find the red
pictures of a folder of mixed colours, and a red photo must find red ones.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest

from clip_service import cli
from clip_service.engines.registry import load_engine
from clip_service.engines.spec import model_identity, parse_model_spec
from clip_service.inputs import images
from clip_service.inputs.images import ImageLimits
from clip_service.library import indexer
from clip_service.library.errors import LibraryError
from clip_service.library.indexer import IndexOptions, journal_path
from clip_service.library.photo_index import PhotoIndexError, read_index, write_index
from clip_service.library.pipeline import DECODE_WORKERS, read_image
from clip_service.settings import Settings
from clip_service.tasks.search import best_matches
from tests.support.server import clean_environment
from tests.support.trained_clip import COLOURS, draw_picture, write_pictures

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = re.compile(r"^indexed (\d+), skipped (\d+), already done (\d+) in [\d.]+ s", re.MULTILINE)
PER_COLOUR = 6


@pytest.fixture(scope="module")
def engine(trained_model_dir):
    return load_engine(parse_model_spec(f"local-dir:{trained_model_dir}"), "cpu", "fp32")


@pytest.fixture
def colour_settings(trained_model_dir) -> Settings:
    return Settings(clip_model=f"local-dir:{trained_model_dir}", device="cpu")


@pytest.fixture
def library(tmp_path) -> Path:
    """8 colours x 6 unseen pictures in colour/<n>.png, a file that is not an image, a hidden file."""
    folder = tmp_path / "photos"
    write_pictures(folder, COLOURS, PER_COLOUR)
    (folder / "notes.jpg").write_bytes(b"not a picture")
    draw_picture("red", "circle").save(folder / ".hidden.png")
    return folder


class CountingEngine:
    """The trained engine, counting the images it embeds; raises KeyboardInterrupt on batch `stop_at`."""

    def __init__(self, engine, stop_at: int = 0):
        self._engine, self.stop_at, self.images, self.batches = engine, stop_at, 0, 0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def encode_images(self, pixels):
        self.batches += 1
        if self.batches == self.stop_at:
            raise KeyboardInterrupt
        self.images += len(pixels)
        return self._engine.encode_images(pixels)


def build(settings, folder, output, engine, **options) -> indexer.Summary:
    return indexer.run(IndexOptions(folder, output, **options), settings, lambda: engine)


def test_every_image_is_indexed_with_the_servers_embedding(colour_settings, library, engine, tmp_path):
    output = tmp_path / "photos.clipindex"
    summary = build(colour_settings, library, output, engine)
    assert (summary.processed, summary.skipped, summary.done) == (len(COLOURS) * PER_COLOUR, 1, 0)
    assert summary.exit_code == 0 and not journal_path(output).exists()
    index = read_index(output)
    assert index.paths == tuple(sorted(f"{colour}/{n}.png" for colour in COLOURS for n in range(PER_COLOUR)))
    assert index.folder == library.resolve() and index.dimensions == 64
    assert index.model == colour_settings.clip_model
    assert index.model_identity == model_identity(colour_settings.model_spec)
    np.testing.assert_allclose(np.linalg.norm(index.embeddings, axis=1), 1.0, atol=1e-5)
    limits = ImageLimits(colour_settings.max_image_bytes, colour_settings.max_image_pixels)
    image, _ = read_image(library / "blue/2.png", limits, engine.input_size)  # as the server reads file=
    alone = engine.encode_images(engine.prepare(image).unsqueeze(0))[0].numpy()
    np.testing.assert_allclose(index.embeddings[index.row_of["blue/2.png"]], alone, atol=1e-5)


def test_a_red_circle_finds_the_red_pictures_first(colour_settings, library, engine, tmp_path):
    output = tmp_path / "photos.clipindex"
    build(colour_settings, library, output, engine)
    index = read_index(output)
    for text in ("a red circle", "red"):
        query = engine.encode_texts([text])[0].numpy()
        matches = best_matches(index.embeddings, index.paths, query, 5)
        assert len(matches) == 5 and [match.score for match in matches] == sorted(
            (match.score for match in matches), reverse=True)
        assert [match.path.split("/")[0] for match in matches] == ["red"] * 5, (text, matches)
    for colour in ("blue", "green", "yellow"):
        query = engine.encode_texts([f"a photo of a {colour} square."])[0].numpy()
        named = [match.path.split("/")[0] for match in best_matches(index.embeddings, index.paths, query, 3)]
        assert named == [colour] * 3, (colour, named)


def test_best_matches_is_exact_and_ordered():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(1000, 16)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    paths = tuple(f"{n}.jpg" for n in range(1000))
    query = embeddings[123] * 0.9 + embeddings[7] * 0.1
    query /= np.linalg.norm(query)
    matches = best_matches(embeddings, paths, query, 10)
    expected = np.argsort(-(embeddings @ query))[:10]
    assert [match.path for match in matches] == [paths[row] for row in expected]
    assert matches[0].path == "123.jpg"
    assert best_matches(embeddings, paths, query, 0) == []
    assert len(best_matches(embeddings[:3], paths[:3], query, 10)) == 3


def test_an_interrupted_run_resumes_from_its_journal(colour_settings, library, engine, tmp_path):
    output = tmp_path / "photos.clipindex"
    interrupted = CountingEngine(engine, stop_at=2)
    summary = build(colour_settings, library, output, interrupted, batch_size=8)
    assert summary.interrupted and summary.processed == 8 and not output.exists()
    assert len(journal_path(output).read_text().splitlines()) == 8
    with pytest.raises(LibraryError, match="pass --resume"):
        build(colour_settings, library, output, engine)
    counting = CountingEngine(engine)
    summary = build(colour_settings, library, output, counting, resume=True, batch_size=8)
    rest = len(COLOURS) * PER_COLOUR - 8
    assert (summary.processed, summary.done) == (rest, 8) and counting.images == rest
    resumed = read_index(output)
    build(colour_settings, library, tmp_path / "whole.clipindex", engine)
    whole = read_index(tmp_path / "whole.clipindex")
    assert resumed.paths == whole.paths
    np.testing.assert_allclose(resumed.embeddings, whole.embeddings, atol=1e-5)


def test_only_model_sized_inputs_wait_for_the_model_never_full_size_photos(colour_settings, library, engine,
                                                                           tmp_path, monkeypatch):
    """A batch of 8 waits for the model: holding 8 decoded photos (plus those read ahead) cost gigabytes
    for 60-megapixel PNGs of a few kilobytes each. Each is made the model's input where it was decoded."""
    decoded = []  # a weak reference to every photo decoded

    def tracked(*args, **kwargs):
        image = loaded_rgb(*args, **kwargs)
        decoded.append(weakref.ref(image))
        return image

    loaded_rgb = images._loaded_rgb
    monkeypatch.setattr(images, "_loaded_rgb", tracked)
    seen = []

    class Watching(CountingEngine):
        def encode_images(self, pixels):
            gc.collect()
            seen.append(sum(reference() is not None for reference in decoded))
            return super().encode_images(pixels)

    build(colour_settings, library, tmp_path / "photos.clipindex", Watching(engine), batch_size=8)
    assert seen and max(seen) <= DECODE_WORKERS, f"full-size photos alive at each forward pass: {seen}"


def test_links_out_of_the_folder_are_not_indexed_links_within_it_are(colour_settings, library, engine,
                                                                     tmp_path, caplog):
    """Whoever can write into the folder must not get a private photo of the operator's searchable."""
    private = tmp_path / "private.png"
    draw_picture("red", "circle", 96, seed=9).save(private)
    (library / "innocent.png").symlink_to(private)
    (library / "again.png").symlink_to(library / "red" / "0.png")
    output = tmp_path / "photos.clipindex"
    summary = build(colour_settings, library, output, engine)
    paths = read_index(output).paths
    assert "again.png" in paths and "innocent.png" not in paths
    assert summary.skipped == 2  # notes.jpg, and the link out
    assert "Skipped innocent.png: a link out of the folder" in caplog.text
    # an index an older version made, holding the link out, loses it on --resume
    older = read_index(output)
    write_index(output, older.folder, older.model, older.model_identity, [*older.paths, "innocent.png"],
                np.vstack([older.embeddings, older.embeddings[:1]]))
    build(colour_settings, library, output, engine, resume=True)
    assert read_index(output).paths == older.paths


def test_resume_adds_new_images_and_drops_gone_ones(colour_settings, library, engine, tmp_path):
    output = tmp_path / "photos.clipindex"
    build(colour_settings, library, output, engine)
    (library / "red/0.png").unlink()
    draw_picture("purple", "square", 96, seed=77).save(library / "new.png")
    counting = CountingEngine(engine)
    summary = build(colour_settings, library, output, counting, resume=True)
    assert counting.images == 1 and summary.processed == 1
    index = read_index(output)
    assert "new.png" in index.paths and "red/0.png" not in index.paths
    assert len(index.paths) == len(COLOURS) * PER_COLOUR
    nothing_new = CountingEngine(engine)
    summary = build(colour_settings, library, output, nothing_new, resume=True)
    # only the unreadable notes.jpg is tried again (it may have been mended): nothing is encoded
    assert (summary.processed, summary.skipped, nothing_new.batches) == (0, 1, 0)
    assert read_index(output).paths == index.paths


def test_an_index_of_another_model_or_folder_is_refused(colour_settings, library, engine, tmp_path,
                                                        tiny_model_dir):
    output = tmp_path / "photos.clipindex"
    build(colour_settings, library, output, engine)
    tiny = dataclasses.replace(colour_settings, clip_model=f"local-dir:{tiny_model_dir}")
    with pytest.raises(LibraryError, match=r"was indexed with CLIP_MODEL=local-dir:.*trained.*, and this "
                                           r"uses CLIP_MODEL=local-dir:.*tiny-clip.*--overwrite"):
        build(tiny, library, output, engine, resume=True)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(LibraryError, match="indexes .*photos, not .*other"):
        build(colour_settings, other, output, engine, resume=True)
    with pytest.raises(PhotoIndexError, match="and this uses CLIP_MODEL"):
        read_index(output).check_model(tiny.clip_model, model_identity(tiny.model_spec))


@pytest.mark.parametrize("content, fragment", [
    (b"", "not a photo index"),
    (b"\xff" * 64, "not a photo index"),
    (b"{}", "not a photo index"),
])
def test_a_file_that_is_not_an_index_is_refused(tmp_path, content, fragment):
    path = tmp_path / "bad.clipindex"
    path.write_bytes(content)
    with pytest.raises(PhotoIndexError, match=fragment):
        read_index(path)
    with pytest.raises(PhotoIndexError, match="does not exist"):
        read_index(tmp_path / "absent.clipindex")


def test_a_damaged_index_is_refused_and_odd_names_survive(tmp_path):
    path = tmp_path / "x.clipindex"
    names = ["a.jpg", "sub dir/ü.png", os.fsdecode(b"raw-\xff.jpg")]
    vectors = np.eye(3, 4, dtype=np.float32)
    write_index(path, tmp_path, "m", "id", names, vectors)
    index = read_index(path)
    assert index.paths == tuple(names) and np.array_equal(index.embeddings, vectors)
    data = path.read_bytes()
    path.write_bytes(data[:-20])  # cut short
    with pytest.raises(PhotoIndexError, match="damaged"):
        read_index(path)


@pytest.mark.parametrize("header", [
    {"__metadata__": {"format": "clip-service-photo-index-v1", "model": "m", "model_identity": "i"}},
    {"__metadata__": {"format": "clip-service-photo-index-v1", "folder": ["x"], "model": "m",
                      "model_identity": "i"}},
    "[" * 100_000 + "]" * 100_000,
], ids=["no-folder", "folder-not-text", "nested-100000-deep"])
def test_a_crafted_index_header_is_refused_as_damaged(tmp_path, header):
    """Whoever can write the index file must not crash the reader with anything but PhotoIndexError."""
    path = tmp_path / "crafted.clipindex"
    text = header if isinstance(header, str) else json.dumps({
        **header, "embeddings": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]},
        "paths": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}})
    data = text.encode()
    path.write_bytes(len(data).to_bytes(8, "little") + data)
    with pytest.raises(PhotoIndexError, match="damaged or not a photo index"):
        read_index(path)


# --- the commands ---------------------------------------------------------------------------------------


def command_env(trained_model_dir, tmp_path) -> dict[str, str]:
    return clean_environment({"CLIP_MODEL": f"local-dir:{trained_model_dir}", "CLIP_DEVICE": "cpu",
                              "CLIP_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)})


def command_runner(env: dict[str, str], cwd: Path, text: bool = True):
    """`python -m clip_service ARGUMENTS...` in `env` (changes to it apply to later runs), its output kept."""
    def run(*arguments: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "clip_service", *arguments], cwd=cwd, env=env,
                              capture_output=True, text=text, timeout=180)

    return run


def test_index_and_search_commands(trained_model_dir, library, tmp_path):
    env = command_env(trained_model_dir, tmp_path)
    output = tmp_path / "photos.clipindex"

    run = command_runner(env, tmp_path)

    done = run("index", str(library), "-o", str(output))
    assert done.returncode == 0, done.stderr
    assert SUMMARY.search(done.stderr).groups() == (str(len(COLOURS) * PER_COLOUR), "1", "0")
    assert "Skipped notes.jpg" in done.stderr
    again = run("index", str(library), "-o", str(output))
    assert again.returncode == 2 and "pass --resume" in again.stderr
    again = run("index", str(library), "-o", str(output), "--resume", "-q")
    assert again.returncode == 0
    assert SUMMARY.search(again.stderr).groups() == ("0", "1", str(len(COLOURS) * PER_COLOUR))

    found = run("search", str(output), "a red circle", "-k", "5")
    assert found.returncode == 0, found.stderr
    lines = [line.split("\t") for line in found.stdout.splitlines()]
    assert len(lines) == 5 and all(Path(path).parent == library / "red" for _, path in lines)
    scores = [float(score) for score, _ in lines]
    assert scores == sorted(scores, reverse=True)

    photo = tmp_path / "query.png"
    draw_picture("blue", "triangle", 96, seed=99).save(photo)
    like = run("search", str(output), "--like", str(photo), "--json", "-k", "3")
    assert like.returncode == 0, like.stderr
    answer = json.loads(like.stdout)
    assert answer["folder"] == str(library.resolve())
    assert [match["path"].split("/")[0] for match in answer["matches"]] == ["blue"] * 3

    # the commands run the server's engine as the settings choose it (int8 exists only in OpenVINO's)
    env["CLIP_PRECISION"] = "int8"
    int8_index = tmp_path / "int8.clipindex"
    done = run("index", str(library), "-o", str(int8_index))
    assert done.returncode == 0 and "with OpenVINO" in done.stderr and "in int8" in done.stderr, done.stderr
    found = run("search", str(int8_index), "a red circle", "-k", "3")
    assert found.returncode == 0, found.stderr
    lines = found.stdout.splitlines()
    assert len(lines) == 3 and all(Path(line.split("\t")[1]).parent == library / "red" for line in lines)
    del env["CLIP_PRECISION"]

    env["CLIP_MODEL"] = f"local-dir:{ROOT}"  # not a model folder: a one-line settings error
    refused = run("search", str(output), "red")
    assert refused.returncode == 2 and refused.stderr.startswith("clip-service: CLIP_MODEL=")


@pytest.mark.parametrize("arguments, fragment", [
    (["index", "x"], "required: -o/--output"),
    (["index", "x", "-o", "i", "--resume", "--overwrite"], "not allowed with argument"),
    (["search", "i", "-k", "0"], "-k"),
    (["search", "i", "-k", "101"], "-k"),
])
def test_bad_arguments_exit_2_with_one_line(arguments, fragment, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(arguments)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("clip-service: ") and error.count("\n") == 1 and fragment in error


def test_search_needs_text_or_like_and_an_index(trained_model_dir, tmp_path, clean_env, capsys):
    clean_env.setenv("CLIP_MODEL", f"local-dir:{trained_model_dir}")
    assert cli.main(["search", str(tmp_path / "i")]) == 2
    assert "TEXT) or --like PHOTO" in capsys.readouterr().err
    assert cli.main(["search", str(tmp_path / "i"), "red", "--like", "x.jpg"]) == 2
    error = capsys.readouterr().err
    assert "one of them" in error and "does not exist" not in error, "both given: refused for that alone"
    assert cli.main(["search", str(tmp_path / "absent.clipindex"), "red"]) == 2
    assert "does not exist; make it with python -m clip_service index" in capsys.readouterr().err
    assert cli.main(["index", str(tmp_path / "missing"), "-o", str(tmp_path / "i")]) == 2
    assert "is not a folder" in capsys.readouterr().err



def test_search_prints_a_name_that_is_not_utf8_byte_for_byte_and_json_shows_it_escaped(
        trained_model_dir, tmp_path):
    folder = tmp_path / "photos"
    write_pictures(folder, ["green", "blue"], 1)
    draw_picture("red", "circle", 96, seed=3).save(os.path.join(os.fsencode(folder), b"caf\xe9.png"), "PNG")
    env = command_env(trained_model_dir, tmp_path)

    run = command_runner(env, tmp_path, text=False)

    index = tmp_path / "odd.clipindex"
    assert run("index", str(folder), "-o", str(index)).returncode == 0
    lines = run("search", str(index), "a red circle", "-k", "1")
    assert lines.returncode == 0, lines.stderr
    score, path = lines.stdout.rstrip(b"\n").split(b"\t")
    assert path == os.fsencode(folder.resolve()) + b"/caf\xe9.png" and os.path.isfile(path)
    answer = json.loads(run("search", str(index), "a red circle", "-k", "1", "--json").stdout)
    assert answer["matches"][0]["path"] == "caf\\xe9.png"
