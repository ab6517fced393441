"""Which stored labels a segmenter learns, as which output classes: the label map.

A data set's HDF5 names its labels (`label_names`: polyps `background, lesion`; KiTS `background, kidney, tumor,
cyst`). A segmenter learns either one foreground (binary: one sigmoid channel) or several classes (a softmax
over background + one channel per class). `--labels` chooses and merges: classes are separated by commas and
labels merged into one class with `+`, by name or number, e.g. `kidney,tumor,cyst` (KiTS's default),
`tumor+cyst` (one "masses" class: binary), `1,2+3`. Labels left out count as background.

The map is recorded in every checkpoint, so prediction writes the labels of the training data back: class k
becomes the first stored label of its group.

`lesion_labels` is the other question a label set answers: which stored labels LAW (the diffusion loss weighter)
treats as lesion (`--lesion-labels`, '+'-separated, e.g. `tumor+cyst`). By default KiTS's masses (tumour and
cyst; the kidney is the organ, not the lesion) and every label > 0 on any other data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lawder_core.errors import DataError, UsageError


@dataclass(frozen=True)
class LabelMap:
    """Foreground classes as groups of stored labels; class 0 is background (every other label)."""

    groups: tuple[tuple[int, ...], ...]
    names: tuple[str, ...]  # one per group
    stored_names: tuple[str, ...]  # the data set's label names, background first

    @property
    def binary(self) -> bool:
        return len(self.groups) == 1

    @property
    def outputs(self) -> int:
        """Output channels: 1 (sigmoid) for one foreground class, else background + one per class (softmax)."""
        return 1 if self.binary else len(self.groups) + 1

    def class_lookup(self) -> np.ndarray:
        """uint8 table: stored label -> class index (0 background)."""
        table = np.zeros(max(256, len(self.stored_names)), np.uint8)
        for k, group in enumerate(self.groups, start=1):
            table[list(group)] = k
        return table

    def label_lookup(self) -> np.ndarray:
        """uint8 table: class index -> the stored label written back (the first label of its group)."""
        return np.array([0, *(group[0] for group in self.groups)], np.uint8)

    def to_stored(self, classes: np.ndarray) -> np.ndarray:
        """Predicted class indices -> the training data's label values (unchanged where class k is label k)."""
        return classes if self.is_identity() else self.label_lookup()[classes]

    def is_identity(self) -> bool:
        """Class k is stored label k for every label of the data set (KiTS's default, polyps)."""
        return list(self.groups) == [(k,) for k in range(1, len(self.stored_names))]

    def separates(self, labels: Sequence[int] | None) -> bool:
        """Whether predictions can score a region made of `labels` (None: every label > 0): no class straddles it."""
        inside = set(range(1, len(self.stored_names))) if labels is None else set(labels)
        kept = {label for group in self.groups for label in group}
        return inside <= kept and all(set(g) <= inside or not set(g) & inside for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        return {"groups": [list(g) for g in self.groups], "names": list(self.names),
                "stored_names": list(self.stored_names)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabelMap:
        return cls(tuple(tuple(int(v) for v in g) for g in data["groups"]), tuple(data["names"]),
                   tuple(data["stored_names"]))


def stored_labels(label_map: LabelMap | None, classes: np.ndarray) -> np.ndarray:
    """`label_map.to_stored(classes)`; a run from before label maps (None) predicted stored labels directly."""
    return classes if label_map is None else label_map.to_stored(classes)


def default_spec(stored_names: Sequence[str]) -> str:
    """Every foreground label its own class (KiTS: kidney, tumor, cyst; polyps: lesion)."""
    return ",".join(str(k) for k in range(1, len(stored_names)))


def label_map(stored_names: Sequence[str], spec: str | None = None, *, option: str = "--labels") -> LabelMap:
    """Parse `--labels` against the data set's label names (None: every foreground label its own class).

    `option` names the flag in error messages (`lesion_labels` parses `--lesion-labels` with this).
    """
    stored_names = tuple(str(n) for n in stored_names)
    if len(stored_names) < 2:
        raise DataError(f"label names {list(stored_names)} have no foreground label.")
    text = default_spec(stored_names) if spec is None or not str(spec).strip() else str(spec)
    groups, names, seen = [], [], set()
    for part in text.split(","):
        group = tuple(sorted(_label_index(token, stored_names, text, option) for token in part.split("+")))
        if seen & set(group):
            raise UsageError(f"{option} {text!r} names label(s) {sorted(seen & set(group))} twice.")
        seen |= set(group)
        groups.append(group)
        names.append("+".join(stored_names[k] for k in group))
    return LabelMap(tuple(groups), tuple(names), stored_names)


def _label_index(token: str, stored_names: tuple[str, ...], spec: str, option: str = "--labels") -> int:
    token = token.strip()
    lowered = [n.lower() for n in stored_names]
    if token.isdigit() and 0 < int(token) < len(stored_names):
        return int(token)
    if token.lower() in lowered[1:]:
        return lowered.index(token.lower(), 1)
    choices = ", ".join(f"{k}={n}" for k, n in enumerate(stored_names) if k)
    hint = (LESION_HINT if option == "--lesion-labels" else
            "Separate classes with ',' and merge labels into one class with '+', e.g. 'kidney,tumor+cyst'.")
    raise UsageError(f"{option} {spec!r}: {token!r} is not a foreground label of this data set ({choices}).", hint)


# ---------------------------------------------------------------- what LAW calls lesion

LESION_NAMES = ("tumor", "tumour", "cyst")  # KiTS's masses: the lesion, where the kidney is the organ around it
LESION_HINT = "Name the lesion labels by name or number, joined by '+', e.g. 'tumor+cyst' (KiTS) or '1'."


def is_kits(stored_names: Sequence[str]) -> bool:
    """KiTS-style label names: a kidney and a tumour (any case, either spelling)."""
    lowered = {str(n).lower() for n in stored_names}
    return "kidney" in lowered and bool(lowered & {"tumor", "tumour"})


def default_lesion_labels(stored_names: Sequence[str]) -> tuple[int, ...]:
    """KiTS: its tumour and cyst labels (those present); any other data: every label > 0."""
    if is_kits(stored_names):
        return tuple(k for k, n in enumerate(stored_names) if k and str(n).lower() in LESION_NAMES)
    return tuple(range(1, len(stored_names)))


def lesion_labels(stored_names: Sequence[str], spec: str | None = None) -> tuple[int, ...]:
    """The stored labels LAW treats as lesion, sorted: `--lesion-labels` parsed like `--labels` (names or
    numbers joined by '+'; the union of its groups, so ',' works too) or, for None/empty, the data set's default."""
    stored_names = tuple(str(n) for n in stored_names)
    if len(stored_names) < 2:
        raise DataError(f"label names {list(stored_names)} have no foreground label.")
    if spec is None or not str(spec).strip():
        return default_lesion_labels(stored_names)
    groups = label_map(stored_names, str(spec), option="--lesion-labels").groups
    return tuple(sorted({label for group in groups for label in group}))


def lesion_names(stored_names: Sequence[str], labels: Sequence[int]) -> str:
    """'tumor+cyst': a lesion set as the names of its labels."""
    return "+".join(str(stored_names[k]) for k in labels)


__all__ = ["LabelMap", "default_lesion_labels", "default_spec", "is_kits", "label_map", "lesion_labels",
           "lesion_names"]
