"""Label files and prompt templates: what the vocabulary is made of, read and checked.

A label file is a `.txt` in CLIP_LABELS_DIR, a label a line (`label` or `label | text the model reads`);
its name is the label group. Prompt templates come from CLIP_PROMPTS_FILE or CLIP_PROMPT_TEMPLATE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class LabelsError(RuntimeError):
    """Labels or templates that cannot be used; the message names the setting and the fix."""


@dataclass(frozen=True)
class LabelSet:
    """Distinct labels in file order, the text the model sees for each, and their groups."""

    labels: tuple[str, ...]
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    texts: tuple[str, ...] = ()  # what the model reads; defaults to the labels themselves

    def __post_init__(self):
        if not self.texts:
            object.__setattr__(self, "texts", self.labels)

    def __len__(self) -> int:
        return len(self.labels)


def parse_label_line(line: str) -> tuple[str, str] | None:
    """`label` or `label | text the model reads` -> (label, text); None for blanks and comments."""
    line = " ".join(line.split())
    if not line or line.startswith("#"):
        return None
    label, _, text = line.partition("|")
    label, text = label.strip(), text.strip()
    return (label, text or label) if label else None


def load_labels(folder: Path) -> LabelSet:
    """Every *.txt in folder, sorted by name: a label a line, `#` comments and blanks skipped.

    Duplicates are dropped case-insensitively; the first occurrence wins.
    """
    seen: set[str] = set()
    labels: list[str] = []
    texts: list[str] = []
    groups: dict[str, tuple[str, ...]] = {}
    for path in sorted(Path(folder).glob("*.txt")):
        group = []
        for line in _text_lines(path, f"The label file {path}"):
            parsed = parse_label_line(line)
            if parsed is None or parsed[0].casefold() in seen:
                continue
            label, text = parsed
            seen.add(label.casefold())
            labels.append(label)
            texts.append(text)
            group.append(label)
        groups[path.stem] = tuple(group)
    if not labels:
        raise LabelsError(f"No labels loaded: {folder} holds no *.txt file with a label in it "
                          "(CLIP_LABELS_DIR)")
    return LabelSet(tuple(labels), groups, tuple(texts))


def load_templates(prompts_file: Path, single_template: str = "") -> tuple[str, ...]:
    """The prompt templates: CLIP_PROMPT_TEMPLATE alone if set, else every line of the prompts file."""
    if single_template:
        return (single_template,)
    lines = _text_lines(Path(prompts_file), f"CLIP_PROMPTS_FILE={prompts_file}",
                        "; point it at a file of prompt templates, one per line")
    templates = tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))
    bad = [template for template in templates if not puts_the_label_in(template)]
    if bad or not templates:
        raise LabelsError(f"CLIP_PROMPTS_FILE={prompts_file} needs one or more templates, each with "
                          f"exactly one {{}} and no other braces; bad: {bad[0] if bad else 'no templates'}")
    return templates


def puts_the_label_in(template: str) -> bool:
    """True when template.format(label) works and holds the label once: "a {0} photo of {}" fails to
    format, and "a photo of {{}}" formats every label to the same text."""
    try:
        return template.count("{}") == 1 and template.format("\0").count("\0") == 1
    except (ValueError, IndexError, KeyError):
        return False


def _text_lines(path: Path, named: str, unreadable_hint: str = "") -> list[str]:
    """The lines of a UTF-8 text file; a LabelsError starting with `named` if it cannot be read as one."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise LabelsError(f"{named} cannot be read ({error.strerror}){unreadable_hint}") from None
    except UnicodeDecodeError as error:
        raise LabelsError(f"{named} is not UTF-8 (byte {error.start}); save it as UTF-8") from None
