"""Dataset layouts: parse labels from file names and list a corpus's files."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cnn_features.errors import InvalidInput

# RAVDESS emotion codes 01..08, in the corpus's own order.
RAVDESS_EMOTIONS = (
    "neutral",
    "calm",
    "happy",
    "sad",
    "angry",
    "fearful",
    "disgust",
    "surprised",
)
# CREMA-D emotion codes and the same names RAVDESS uses.
CREMA_D_EMOTIONS = {
    "ANG": "angry",
    "DIS": "disgust",
    "FEA": "fearful",
    "HAP": "happy",
    "NEU": "neutral",
    "SAD": "sad",
}

# modality (01 AV, 02 video, 03 audio) - vocal channel (01 speech, 02 song) -
# emotion - intensity - statement - repetition - actor.
_RAVDESS_NAME = re.compile(
    r"^0[1-3]-0[12]-(?P<emotion>0[1-8])-0[12]-0[12]-0[12]-(?P<actor>\d{2})\.npy$"
)
# actor - sentence - emotion - level.
_CREMA_D_NAME = re.compile(
    r"^(?P<actor>\d{4})_(?P<sentence>[A-Z]{3})_(?P<emotion>ANG|DIS|FEA|HAP|NEU|SAD)"
    r"_(?P<level>LO|MD|HI|XX)\.npy$"
)


@dataclass(frozen=True)
class ClipLabel:
    """What a clip's file name says about it."""

    clip_id: str
    emotion: str
    actor: str


def _folder_and_name(relpath: str) -> tuple[str | None, str]:
    """Return (name of the parent folder, or None at the top; file name) as ``pathlib`` reads them.

    A plain ``a/b/c`` path is split as a string: a million ``Path`` objects
    cost a plan over ten seconds. Anything else (``.`` or empty segments) goes
    through ``Path``, so both give the same answer.
    """
    parts = relpath.split("/")
    if "" in parts or "." in parts:
        path = Path(relpath)
        return (None if path.parent == Path(".") else path.parent.name), path.name
    return (parts[-2] if len(parts) > 1 else None), parts[-1]


def parse_ravdess(relpath: str) -> ClipLabel:
    """Parse ``Actor_AA/03-01-EE-II-SS-RR-AA.npy``; the folder must match the actor."""
    folder, name = _folder_and_name(relpath)
    match = _RAVDESS_NAME.match(name)
    if match is None:
        msg = f"{relpath}: name does not follow RAVDESS 'MM-VV-EE-II-SS-RR-AA.npy'"
        raise InvalidInput(msg)
    actor = match["actor"]
    if not 1 <= int(actor) <= 99:
        msg = f"{relpath}: actor {actor} out of range"
        raise InvalidInput(msg)
    if folder != f"Actor_{actor}":
        msg = f"{relpath}: actor {actor} in the name but file is in {folder or 'the root'!r}, not 'Actor_{actor}'"
        raise InvalidInput(msg)
    emotion = RAVDESS_EMOTIONS[int(match["emotion"]) - 1]
    # The modality digit is left out of the clip id: the audio-only and the
    # audio-visual recording of a take are the same clip.
    return ClipLabel(clip_id=name.removesuffix(".npy")[3:], emotion=emotion, actor=actor)


def parse_crema_d(relpath: str) -> ClipLabel:
    """Parse ``AAAA_SSS_EEE_LL.npy`` in the corpus's flat folder."""
    folder, name = _folder_and_name(relpath)
    match = _CREMA_D_NAME.match(name)
    if match is None:
        msg = f"{relpath}: name does not follow CREMA-D 'AAAA_SSS_EEE_LL.npy'"
        raise InvalidInput(msg)
    if folder is not None:
        msg = f"{relpath}: CREMA-D files belong in the dataset's top folder"
        raise InvalidInput(msg)
    return ClipLabel(
        clip_id=name.removesuffix(".npy"),
        emotion=CREMA_D_EMOTIONS[match["emotion"]],
        actor=match["actor"],
    )


@dataclass(frozen=True)
class DatasetSpec:
    """A corpus layout the pipeline knows."""

    name: str
    parse: Callable[[str], ClipLabel]
    emotions: tuple[str, ...]


DATASETS: dict[str, DatasetSpec] = {
    "ravdess": DatasetSpec("ravdess", parse_ravdess, RAVDESS_EMOTIONS),
    "crema_d": DatasetSpec(
        "crema_d",
        parse_crema_d,
        tuple(e for e in RAVDESS_EMOTIONS if e in CREMA_D_EMOTIONS.values()),
    ),
}


def get_dataset(name: str) -> DatasetSpec:
    """Return the layout called ``name`` or raise naming the known ones."""
    try:
        return DATASETS[name]
    except KeyError:
        msg = f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}"
        raise InvalidInput(msg) from None


def label_all(spec: DatasetSpec, relpaths: list[str]) -> tuple[dict[str, ClipLabel], dict[str, str]]:
    """Label every file; return labels and the reasons files were rejected.

    A name that does not parse is rejected, never guessed. A clip id seen a
    second time is rejected as a duplicate of the first file (in sorted order).
    """
    labels: dict[str, ClipLabel] = {}
    rejected: dict[str, str] = {}
    first_of: dict[str, str] = {}
    for rel in relpaths:
        if not rel.endswith(".npy"):
            rejected[rel] = f"{rel}: not a .npy file"
            continue
        try:
            label = spec.parse(rel)
        except InvalidInput as exc:
            rejected[rel] = str(exc)
            continue
        if label.clip_id in first_of:
            rejected[rel] = f"{rel}: duplicate clip id {label.clip_id!r}, already at {first_of[label.clip_id]}"
            continue
        first_of[label.clip_id] = rel
        labels[rel] = label
    return labels, rejected


# What a dataset's input or output must look like for the trigger form to
# accept it: an absolute path, or s3://bucket[/prefix] with a bucket name S3
# allows. The form checks this before a run exists; plan_shards still checks
# everything (REST and the CLI bypass the form).
LOCATION_PATTERN = r"^(/|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/|$))"


def conf_schema() -> dict[str, object]:
    """Return the JSON schema of the run conf's ``datasets`` field: known layout names, each with an absolute input and output."""
    location = {"type": "string", "minLength": 1, "pattern": LOCATION_PATTERN}
    return {
        "type": "object",
        "minProperties": 1,
        "propertyNames": {"enum": sorted(DATASETS)},
        "additionalProperties": {
            "type": "object",
            "required": ["input", "output"],
            "properties": {
                "input": {**location, "description": "spectrogram folder: an absolute path or s3://bucket/prefix"},
                "output": {**location, "description": "feature folder: an absolute path or s3://bucket/prefix"},
            },
            "additionalProperties": False,
        },
    }
