"""Reader for the sktime/aeon ``.ts`` text format, and a locator for the data files
shipped inside the ``aeon`` / ``sktime`` wheels.

Format: ``#`` comment lines, ``@tag value`` header lines, then ``@data`` followed by one case
per line. Within a case, dimensions are separated by ``:`` and values by ``,``; with
``@classLabel true`` (or ``@targetLabel true``) the last ``:`` field is the label. Cases may
differ in length, but all dimensions of one case must have the same length so the case becomes
a (T, D) array.

Only the plain value format is supported: ``@timeStamps true`` files (``(t,v)`` tuples) are
rejected with a clear error rather than silently misread.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "TsFormatError",
    "TsHeader",
    "dataset_path",
    "load_classification",
    "read_ts",
    "read_ts_header",
]

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
MissingPolicy = Literal["error", "nan"]

# Tokens that mean "missing value" in .ts files ('?' is the documented one; NaN appears in
# files written by aeon/sktime writers).
_MISSING_TOKENS = frozenset({"?", "nan", "NaN", "NAN"})
_SEARCH_PACKAGES = ("aeon", "sktime")


class TsFormatError(ValueError):
    """A .ts file that does not follow the format (message names file and line)."""


@dataclass(frozen=True)
class TsHeader:
    """The ``@`` header of a .ts file. Tag names are matched case-insensitively
    (JapaneseVowels writes ``@timeStamps``, its ``_eq`` variant ``@timestamps``)."""

    problem_name: str = ""
    timestamps: bool = False
    missing: bool = False
    univariate: bool | None = None
    dimensions: int | None = None
    equal_length: bool | None = None
    series_length: int | None = None
    has_class_label: bool = False
    # Labels in the order the header declares them: this, not sorted(), defines the class
    # index (PLAID declares 0..10; string sorting would put "10" before "2").
    class_labels: tuple[str, ...] = ()
    has_target_label: bool = False
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def has_label(self) -> bool:
        return self.has_class_label or self.has_target_label


def _parse_bool(value: str, where: str) -> bool:
    low = value.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    raise TsFormatError(f"{where}: expected true/false, got {value!r}")


def _header_from_tags(tags: dict[str, str], where: str) -> TsHeader:
    def flag(name: str, default: bool | None) -> bool | None:
        return _parse_bool(tags[name], where) if name in tags else default

    def integer(name: str) -> int | None:
        if name not in tags:
            return None
        try:
            return int(tags[name])
        except ValueError:
            message = f"{where}: @{name} must be an integer, got {tags[name]!r}"
            raise TsFormatError(message) from None

    class_words = tags.get("classlabel", "false").split()
    has_class = bool(class_words) and _parse_bool(class_words[0], where)
    return TsHeader(
        problem_name=tags.get("problemname", ""),
        timestamps=bool(flag("timestamps", False)),
        missing=bool(flag("missing", False)),
        univariate=flag("univariate", None),
        dimensions=integer("dimensions"),
        equal_length=flag("equallength", None),
        series_length=integer("serieslength"),
        has_class_label=has_class,
        class_labels=tuple(class_words[1:]) if has_class else (),
        has_target_label=bool(flag("targetlabel", False)),
        tags=dict(tags),
    )


def _read_lines(path: Path) -> list[str]:
    # utf-8-sig drops a leading byte-order mark; PLAID's header even has one after its first '#'.
    return path.read_text(encoding="utf-8-sig").splitlines()


def _split_header(path: Path, lines: list[str]) -> tuple[TsHeader, int]:
    """Parse header lines; return the header and the index of the first line after ``@data``."""
    tags: dict[str, str] = {}
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("@"):
            raise TsFormatError(f"{path}:{number}: data before @data line")
        name, _, value = line[1:].partition(" ")
        name = name.lower()
        if name == "data":
            return _header_from_tags(tags, f"{path}"), number
        tags[name] = value.strip()
    raise TsFormatError(f"{path}: no @data line")


def read_ts_header(path: str | Path) -> TsHeader:
    """Read only the header of a .ts file."""
    path = Path(path)
    return _split_header(path, _read_lines(path))[0]


def _parse_values(text: str, missing: MissingPolicy, where: str) -> FloatArray:
    tokens = [token.strip() for token in text.split(",")]
    if tokens == [""]:
        raise TsFormatError(f"{where}: empty dimension")
    if any(token in _MISSING_TOKENS for token in tokens):
        if missing == "error":
            raise TsFormatError(
                f"{where}: missing value ('?'/NaN) found; pass missing='nan' to keep it as NaN"
            )
        tokens = ["nan" if token in _MISSING_TOKENS else token for token in tokens]
    try:
        return np.asarray([float(token) for token in tokens], dtype=np.float32)
    except ValueError as error:
        raise TsFormatError(f"{where}: {error}") from None


def read_ts(
    path: str | Path, *, missing: MissingPolicy = "error"
) -> tuple[list[FloatArray], list[str]]:
    """Read a .ts file into float32 arrays shaped (T, D) and their string labels.

    ``missing="error"`` (default) rejects ``?``/NaN values; ``missing="nan"`` keeps them as NaN.
    Labels are returned as written; an unlabelled file gives an empty label list. Use
    :func:`read_ts_header` (``class_labels``) for the declared label order.
    """
    path = Path(path)
    lines = _read_lines(path)
    header, start = _split_header(path, lines)
    if header.timestamps:
        raise TsFormatError(f"{path}: @timeStamps true files are not supported")
    expected_dims = header.dimensions or (1 if header.univariate else None)
    declared = set(header.class_labels)

    series: list[FloatArray] = []
    labels: list[str] = []
    for number in range(start + 1, len(lines) + 1):
        line = lines[number - 1].strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        fields = line.split(":")
        if header.has_label:
            if len(fields) < 2:
                raise TsFormatError(f"{where}: expected values and a label")
            label = fields.pop().strip()
            if declared and label not in declared:
                raise TsFormatError(f"{where}: label {label!r} not declared in @classLabel")
            labels.append(label)
        dims = [_parse_values(text, missing, f"{where} dim {i}") for i, text in enumerate(fields)]
        if expected_dims is None:
            expected_dims = len(dims)  # no @dimensions tag: the first case decides
        if len(dims) != expected_dims:
            raise TsFormatError(f"{where}: {len(dims)} dimensions, expected {expected_dims}")
        lengths = {len(d) for d in dims}
        if len(lengths) != 1:
            raise TsFormatError(f"{where}: dimensions of one case differ in length {lengths}")
        series.append(np.stack(dims, axis=1))
    if not series:
        raise TsFormatError(f"{path}: no cases after @data")
    return series, labels


def dataset_path(
    name: str,
    split: str,
    packages: tuple[str, ...] = _SEARCH_PACKAGES,
    folder: str | None = None,
) -> Path:
    """Path of ``<name>_<SPLIT>.ts`` shipped in the aeon or sktime wheel, looked for in
    ``datasets/data/<folder or name>/`` (aeon keeps ``JapaneseVowels_eq`` in ``JapaneseVowels/``).

    Looks the packages up with ``importlib.util.find_spec`` so neither is imported (importing
    aeon/sktime takes seconds and pulls in scikit-learn); the server never needs them.
    """
    filename = f"{name}_{split.upper()}.ts"
    searched: list[str] = []
    for package in packages:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            searched.append(f"{package} (not installed)")
            continue
        for root in spec.submodule_search_locations:
            candidate = Path(root) / "datasets" / "data" / (folder or name) / filename
            if candidate.is_file():
                return candidate
            searched.append(str(candidate))
    raise FileNotFoundError(
        f"{filename} not found; searched: {', '.join(searched)}. The training data ship inside "
        "the aeon and sktime wheels: pip install 'rnnserve[train]'"
    )


def load_classification(
    name: str, split: str, folder: str | None = None
) -> tuple[list[FloatArray], IntArray, tuple[str, ...]]:
    """A shipped classification split: (T, D) float32 arrays, class indices, and the class
    labels in the header's declared order (index i means ``class_labels[i]``)."""
    path = dataset_path(name, split, folder=folder)
    classes = read_ts_header(path).class_labels
    series, labels = read_ts(path)
    if not classes:
        raise TsFormatError(f"{path}: no @classLabel list to index labels by")
    index = {label: i for i, label in enumerate(classes)}
    return series, np.array([index[label] for label in labels], dtype=np.int64), classes
