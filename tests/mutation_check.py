"""Planted bugs the test suite must catch: run each on a copy of the repository, expect a failing test.

    .venv/bin/python tests/mutation_check.py            # every mutant (about 3 minutes on 2 cores)
    .venv/bin/python tests/mutation_check.py --list     # what each mutant breaks, and its tests
    .venv/bin/python tests/mutation_check.py --only threshold-off-by-one limit-off-by-one

Each mutant is one exact snippet of the code replaced by a bug a user would suffer from. The check
stops at once if a snippet is no longer found exactly once (the code moved on: update the mutant), so
a mutant can never silently become a no-op. The working tree is never changed: every mutant runs on
a fresh temporary copy of the tracked and untracked-but-not-ignored files, so an interrupted run
leaves no bug behind. The selected tests first run on an unchanged copy and must pass there; then,
for each mutant, pytest -x on its selection must FAIL (exit status 1). A selection that passes is a
surviving mutant; a collection or import error, or a timeout, is reported as an error, not a catch.
Exit status 0 only when every mutant is caught; the table names the test that caught each one.

Each pytest run is a child forked from this process after it imported torch, open_clip and the
other heavy libraries (never the project), which saves about 4 s of imports a run; the child
imports clip_service and the tests from its own copy, and checks that it did.

This file is not collected by pytest (its name does not start with test_).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300
PRELOAD = ("torch", "numpy", "PIL.Image", "open_clip", "flask", "requests", "safetensors.torch", "pytest")
OPTIONS = "tests/test_options.py"  # its whole file loads the model many times: name the tests


@dataclass(frozen=True)
class Mutant:
    name: str
    bug: str  # what a user would suffer
    path: str  # relative to the repository root
    original: str  # must occur exactly once in the file
    replacement: str
    tests: tuple[str, ...]  # pytest node ids or files: real tests of the suite that must fail


MUTANTS = (
    Mutant(
        "label-features-misaligned",
        "every label is scored against its neighbour's text feature",
        "clip_service/vocabulary/features.py",
        "                                for text in label_set.texts])",
        "                                for text in label_set.texts[1:] + label_set.texts[:1]])",
        ("tests/test_labels.py",),
    ),
    Mutant(
        "new-labels-encoded-in-another-order",
        "labels encoded in one order and paired with their features in another",
        "clip_service/vocabulary/features.py",
        "ensemble_features(encoder, tuple(missing), templates)",
        "ensemble_features(encoder, tuple(sorted(missing)), templates)",
        ("tests/test_labels.py",),
    ),
    Mutant(
        "ensemble-mean-not-renormalised",
        "the prompt ensemble's mean of unit features is used without normalising it again",
        "clip_service/vocabulary/features.py",
        "    return torch.nn.functional.normalize(total, dim=-1)",
        "    return total / len(templates)",
        ("tests/test_labels.py",),
    ),
    Mutant(
        "reload-pairs-wrong-features",
        "a label reload reuses each text's feature from its neighbour",
        "clip_service/vocabulary/features.py",
        "return dict(zip(self.label_set.texts, self.features, strict=True))",
        "return dict(zip(self.label_set.texts, self.features.roll(1, dims=0), strict=True))",
        ("tests/test_labels.py", f"{OPTIONS}::test_reload_keeps_each_label_with_its_own_feature"),
    ),
    Mutant(
        "reload-keeps-features-of-old-templates",
        "after the prompt templates change, a reload reuses features made with the old templates",
        "clip_service/vocabulary/reload.py",
        "if previous and previous.templates == templates else None",
        "if previous else None",
        (f"{OPTIONS}::test_reload_encodes_only_new_labels_and_changes_the_version",
         f"{OPTIONS}::test_reload_after_a_template_change_encodes_every_label_again"),
    ),
    Mutant(
        "label-cache-shared-across-models",
        "the label-feature cache key ignores the model, so another model's features are reused",
        "clip_service/vocabulary/features.py",
        "for part in (CACHE_FORMAT, model_identity, str(len(templates)), *templates, *texts):",
        "for part in (CACHE_FORMAT, str(len(templates)), *templates, *texts):",
        ("tests/test_labels.py",),
    ),
    Mutant(
        "model-identity-ignores-weights",
        "retrained weights in the same local-dir folder reuse the old label-feature cache",
        "clip_service/engines/spec.py",
        'return f"local-dir:{folder}|{digest.hexdigest()}"',
        'return f"local-dir:{folder}"',
        ("tests/test_model.py::test_identity_changes_with_weights",),
    ),
    Mutant(
        "image-features-unnormalised",
        "image features are not unit length, so confidences depend on the picture's feature norm",
        "clip_service/engines/torch_engine.py",
        "return torch.nn.functional.normalize(features.float(), dim=-1).cpu()",
        "return features.float().cpu()",
        ("tests/test_model.py::test_engine_gives_unit_features",),
    ),
    Mutant(
        "text-features-unnormalised",
        "text features are not unit length",
        "clip_service/engines/tokens.py",  # every engine's text batches end here
        "encoded = torch.nn.functional.normalize(encode(batch).float(), dim=-1).cpu()",
        "encoded = encode(batch).float().cpu()",
        ("tests/test_model.py::test_engine_gives_unit_features",),
    ),
    Mutant(
        "batch-results-swapped",
        "requests sharing a micro-batch receive each other's image features",
        "clip_service/runtime/batching.py",
        "pending.result = features[start:end]",
        "pending.result = features.flip(0)[start:end]",
        ("tests/test_speed_paths.py::test_batched_answers_equal_unbatched",),
    ),
    Mutant(
        "groups-scored-against-wrong-rows",
        "groups= scores its labels against the first rows of the vocabulary, not their own",
        "clip_service/tasks/classify.py",
        "vocabulary.features[rows]",
        "vocabulary.features[:len(rows)]",
        (f"{OPTIONS}::test_groups_score_only_their_labels",
         f"{OPTIONS}::test_groups_score_their_labels_own_features"),
    ),
    Mutant(
        "request-labels-misaligned",
        "labels= pairs the request's labels with each other's features",
        "clip_service/vocabulary/custom_labels.py",
        "self._encode(labels, templates, deadline, asked_by)",
        "self._encode(labels, templates, deadline, asked_by).flip(0)",
        (f"{OPTIONS}::test_request_labels_replace_the_vocabulary",
         f"{OPTIONS}::test_request_label_features_are_cached",
         f"{OPTIONS}::test_request_labels_get_their_own_features"),
    ),
    Mutant(
        "labels-encoded-once-per-request",
        "requests asking the same new labels at once each encode them, one at a time, instead of "
        "waiting for the one encoding (a thread pool's requests are refused or time out)",
        "clip_service/vocabulary/custom_labels.py",
        "                flight = self._flights.get(key)",
        "                flight = None",
        ("tests/test_custom_labels.py::test_the_same_new_labels_asked_at_once_are_encoded_once_for_all",),
    ),
    Mutant(
        "decode-budget-not-reserved",
        "decodes take no share of DECODE_MEMORY_MB, so sixteen bombs at once hold gigabytes",
        "clip_service/inputs/budget.py",
        "            self._used += cost",
        "            self._used += 0",
        ("tests/test_budget.py",),
    ),
    Mutant(
        "threshold-off-by-one",
        "a confidence exactly at the threshold is dropped",
        "clip_service/tasks/classify.py",
        "        if confidence < threshold:",
        "        if confidence <= threshold:",
        ("tests/test_scoring.py",),
    ),
    Mutant(
        "threshold-before-rounding",
        "the threshold is applied to the unrounded value, so a reported 0.010 can fail 0.01",
        "clip_service/tasks/classify.py",
        "        if confidence < threshold:",
        "        if value < threshold:",
        ("tests/test_scoring.py",),
    ),
    Mutant(
        "limit-off-by-one",
        "one prediction more than the limit is returned",
        "clip_service/tasks/classify.py",
        "count = min(limit, probabilities.numel())",
        "count = min(limit + 1, probabilities.numel())",
        ("tests/test_scoring.py",),
    ),
    Mutant(
        "sigmoid-bias-ignored",
        "SigLIP models' logit bias is dropped",
        "clip_service/tasks/classify.py",
        "return torch.sigmoid(logits + logit_bias)",
        "return torch.sigmoid(logits)",
        ("tests/test_scoring.py",),
    ),
    Mutant(
        "file-root-lets-sibling-through",
        "ALLOWED_FILE_ROOTS=/srv/photos also lets /srv/photos-evil be read",
        "clip_service/inputs/images.py",
        "if not any(real.is_relative_to(root) for root in allowed_roots):",
        "if not any(str(real).startswith(str(root)) for root in allowed_roots):",
        ("tests/test_image_input.py",),
    ),
    Mutant(
        "file-root-follows-symlinks-out",
        "the root check does not resolve symlinks, so a link out of an allowed folder passes it "
        "(only read_file's open beneath the root still stops it)",
        "clip_service/inputs/images.py",
        "real = Path(os.path.realpath(raw_path))",
        "real = Path(os.path.abspath(raw_path))",
        ("tests/test_image_input.py",),
    ),
    Mutant(
        "file-size-limit-off-by-one",
        "a file of exactly MAX_IMAGE_BYTES is refused",
        "clip_service/inputs/images.py",
        "if info.st_size > max_bytes:",
        "if info.st_size >= max_bytes:",
        ("tests/test_image_input.py",),
    ),
    Mutant(
        "ssrf-check-skipped-on-redirect",
        "a redirect hop is fetched without the address guard, reaching private networks",
        "clip_service/inputs/url_fetch.py",
        "                response = session.get(",
        "                response = (session if _hop == 0 else requests.Session()).get(",
        ("tests/test_url_fetch.py",),
    ),
    Mutant(
        "ssrf-connects-to-the-name",
        "the guard checks one DNS answer but connects to the name again (DNS rebinding)",
        "clip_service/inputs/url_fetch.py",
        "(sockaddr[0], sockaddr[1]), self.timeout,",
        "(self._dns_host, sockaddr[1]), self.timeout,",
        ("tests/test_url_fetch.py",),
    ),
    Mutant(
        "ssrf-ipv4-mapped-address-allowed",
        "::ffff:127.0.0.1 (an IPv4-mapped address) passes the private-address check",
        "clip_service/inputs/url_fetch.py",
        "embedded = address.ipv4_mapped or address.sixtofour",
        "embedded = address.sixtofour",
        ("tests/test_url_fetch.py",),
    ),
    Mutant(
        "ssrf-through-an-environment-proxy",
        "HTTP_PROXY in the service's environment sends fetches through a proxy the guard cannot see",
        "clip_service/inputs/url_fetch.py",
        "    session.trust_env = False",
        "    session.trust_env = True",
        ("tests/test_url_fetch.py",),
    ),
    Mutant(
        "url-size-limit-only-when-declared",
        "a body sent without Content-Length is read past MAX_IMAGE_BYTES",
        "clip_service/inputs/url_fetch.py",
        "                if len(body) > self.max_bytes:",
        "                if declared and len(body) > self.max_bytes:",
        ("tests/test_url_fetch.py",),
    ),
    Mutant(
        "front-door-uncounts-a-body-twice",
        "the door's count of the upload bytes it holds drifts with every refused request, until it "
        "refuses uploads it has room for (or admits more than its limit)",
        "clip_service/http/front_door.py",
        "        if conn in self.reading:\n            del self.reading[conn]\n"
        "            self.poller.unregister(conn.sock)\n            self.buffered -= conn.held",
        "        if conn in self.reading:\n            del self.reading[conn]\n"
        "            self.poller.unregister(conn.sock)\n        self.buffered -= conn.held",
        ("tests/test_front_door.py::test_the_door_counts_only_the_bytes_of_requests_it_is_still_reading",),
    ),
    Mutant(
        "front-door-lets-requests-past-max-queue",
        "gunicorn's front door hands on a request past MAX_QUEUE, so it waits for a thread instead of "
        "getting 503 at once",
        "clip_service/http/front_door.py",
        "if self.heavy_in_flight >= self.max_queue:",
        "if self.heavy_in_flight > self.max_queue:",
        ("tests/test_overload.py::test_overload_refuses_with_503_and_health_stays_up",),
    ),
    Mutant(
        "front-door-ends-the-worker-out-of-descriptors",
        "running out of file descriptors in accept re-raises, which ends the worker and reloads the model",
        "clip_service/http/front_door.py",
        "            if error.errno in OUT_OF_DESCRIPTORS:",
        "            if error.errno in ():",
        ("tests/test_front_door.py::test_out_of_descriptors_the_door_pauses_accepting_instead_of_ending_the_worker",),
    ),
    Mutant(
        "file-opened-without-the-root",
        "file= is opened by its checked path, not beneath its root, so a folder swapped for a symlink "
        "after the check leads outside ALLOWED_FILE_ROOTS",
        "clip_service/inputs/images.py",
        "root = next((root for root in allowed_roots if real.is_relative_to(root)), None)",
        "root = None",
        ("tests/test_image_input.py::test_a_folder_swapped_after_the_check_is_not_followed_when_opened",
         "tests/test_image_input.py::test_a_folder_swapped_for_a_symlink_never_leads_outside"),
    ),
    Mutant(
        "deadline-from-admission",
        "REQUEST_TIMEOUT counts from when a thread took the request, not from its arrival, so time "
        "spent queueing is free",
        "clip_service/runtime/admission.py",
        "deadline = (now if arrived is None else arrived) + self.request_timeout",
        "deadline = now + self.request_timeout",
        ("tests/test_runtime.py::test_the_deadline_counts_from_arrival_not_admission",),
    ),
)


def check_snippets(mutants: tuple[Mutant, ...]) -> list[str]:
    """Problems that make a mutant meaningless: a missing file, or a snippet not found exactly once."""
    problems = []
    for mutant in mutants:
        path = ROOT / mutant.path
        if not path.is_file():
            problems.append(f"{mutant.name}: {mutant.path} does not exist")
            continue
        count = path.read_text(encoding="utf-8").count(mutant.original)
        if count != 1:
            problems.append(f"{mutant.name}: the original snippet occurs {count} times in {mutant.path} "
                            f"(expected exactly once; update the mutant): {mutant.original!r}")
        if mutant.original == mutant.replacement:
            problems.append(f"{mutant.name}: the replacement equals the original")
    return problems


def project_files() -> list[str]:
    """Tracked files and untracked files git does not ignore, as they are in the working tree."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    return [name for name in listed if name and (ROOT / name).is_file()]


def make_copy(files: list[str], parent: Path, name: str) -> Path:
    copy = parent / name
    for relative in files:
        target = copy / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, target)
    venv = ROOT / ".venv"
    if venv.exists():  # CLIP.sh and the tests find the interpreter at .venv
        (copy / ".venv").symlink_to(venv.resolve())
    return copy


def preload() -> None:
    """Import the heavy third-party libraries once; every pytest run forks from here and skips them.

    Nothing of the project is imported here: each run imports clip_service from its own copy.
    """
    for name in PRELOAD:
        importlib.import_module(name)
    leaked = [name for name in sys.modules if name.split(".")[0] in ("clip_service", "tests", "conftest")]
    if leaked or threading.active_count() != 1:
        raise SystemExit(f"preloading imported project modules or started threads: {leaked}")


def run_pytest(copy: Path, tests: tuple[str, ...]) -> tuple[int | None, float, str]:
    """(exit status, seconds, output) of pytest -x on the selection in a forked child; None on a timeout."""
    log_path = copy.parent / f"{copy.name}.log"
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _pytest_in_child(copy, tests, log_path)
    status: int | None = None
    try:
        while True:
            done, wait_status = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(wait_status)
                break
            if time.monotonic() - started > TIMEOUT_S:
                _kill(pid)
                break
            time.sleep(0.05)
    except BaseException:  # an interrupted check leaves no test run behind
        _kill(pid)
        raise
    output = log_path.read_text(errors="replace") if log_path.exists() else ""
    return status, time.monotonic() - started, output


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # the child leads its own process group (servers it started)
    except ProcessLookupError:
        return
    os.waitpid(pid, 0)


def _in_working_tree(file: str | None) -> bool:
    """Whether a module was loaded from the working tree (this check and the virtual environment aside)."""
    if not file:
        return False
    path = Path(file).resolve()
    return (path.is_relative_to(ROOT) and not path.is_relative_to(ROOT / ".venv")
            and path != Path(__file__).resolve())


def _pytest_in_child(copy: Path, tests: tuple[str, ...], log_path: Path) -> None:
    code = 3
    try:
        os.setpgid(0, 0)
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.chdir(copy)
        sys.dont_write_bytecode = True  # a mutated module never leaves a .pyc another run could use
        os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
        sys.path[:] = [entry for entry in sys.path
                       if entry and Path(entry).resolve() not in (ROOT, ROOT / "tests")]
        for name in [name for name in sys.modules if name.split(".")[0] in ("tests", "bench")]:
            del sys.modules[name]  # the tests package (tests.support, conftest) comes from the copy
        import pytest

        code = int(pytest.main(["-x", "-q", "-p", "no:cacheprovider",
                                "-W", "ignore::pytest.PytestAssertRewriteWarning", *tests]))
        stray = [name for name, module in list(sys.modules.items())
                 if _in_working_tree(getattr(module, "__file__", None))]
        if stray or "clip_service" not in sys.modules:
            print(f"The tests did not run on the copy {copy}: from the working tree: {stray}")
            code = 3
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # no interpreter teardown: test threads die with the child


def verdict(status: int | None) -> str:
    if status == 1:
        return "caught"
    if status == 0:
        return "SURVIVED"
    return "TIMEOUT" if status is None else f"ERROR (pytest exit {status})"


def first_failure(output: str) -> str:
    """The node id of the first failing test in pytest's short summary (-ra), or ''."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):  # "FAILED <node id> - <message>"; ids may hold spaces
            return line.split(" ", 1)[1].split(" - ", 1)[0]
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    arguments = parser.parse_args()

    mutants = MUTANTS
    if arguments.only:
        unknown = sorted(set(arguments.only) - {mutant.name for mutant in MUTANTS})
        if unknown:
            parser.error(f"unknown mutant(s): {', '.join(unknown)}; see --list")
        mutants = tuple(mutant for mutant in MUTANTS if mutant.name in arguments.only)
    if arguments.list:
        for mutant in mutants:
            print(f"{mutant.name}: {mutant.bug}\n    {mutant.path}: {mutant.original.strip()!r}\n"
                  f"    -> {mutant.replacement.strip()!r}\n    tests: {' '.join(mutant.tests)}")
        return 0

    problems = check_snippets(mutants)
    if problems:
        print("Mutation check cannot run; the code no longer holds these snippets:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 2

    files = project_files()
    started = time.monotonic()
    preload()
    results = []
    with tempfile.TemporaryDirectory(prefix="clip-mutants-") as scratch:
        selection = tuple(dict.fromkeys(test for mutant in mutants for test in mutant.tests))
        status, seconds, output = run_pytest(make_copy(files, Path(scratch), "baseline"), selection)
        print(f"baseline, no mutant: {len(selection)} test selections "
              f"{'passed' if status == 0 else verdict(status)} in {seconds:.1f} s", flush=True)
        if status != 0:
            print(output[-6000:], file=sys.stderr)
            print("The selected tests must pass on the unchanged code before mutants mean anything.",
                  file=sys.stderr)
            return 2
        for mutant in mutants:
            copy = make_copy(files, Path(scratch), mutant.name)
            target = copy / mutant.path
            target.write_text(target.read_text(encoding="utf-8").replace(mutant.original, mutant.replacement),
                              encoding="utf-8")
            status, seconds, output = run_pytest(copy, mutant.tests)
            result = verdict(status)
            results.append((mutant, result, seconds, first_failure(output) if status == 1 else ""))
            print(f"  {mutant.name}: {result} in {seconds:.1f} s", flush=True)
            if status != 1:
                print("\n".join(f"    | {line}" for line in output.strip().splitlines()[-15:]), flush=True)
            shutil.rmtree(copy)

    width = max(len(mutant.name) for mutant in mutants)
    result_width = max(len(result) for _, result, _, _ in results)
    print(f"\n{'mutant':<{width}}  {'result':<{result_width}}  {'seconds':>7}  caught by")
    for mutant, result, seconds, caught_by in results:
        print(f"{mutant.name:<{width}}  {result:<{result_width}}  {seconds:7.1f}  {caught_by}")
    missed = [mutant.name for mutant, result, _, _ in results if result != "caught"]
    print(f"\n{len(results) - len(missed)} of {len(results)} planted bugs caught in "
          f"{time.monotonic() - started:.0f} s")
    if missed:
        print(f"Not caught: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
