"""Label parsing and file listing for the RAVDESS and CREMA-D layouts."""

from __future__ import annotations


import pytest

from cnn_features.datasets import DATASETS, get_dataset, label_all, parse_crema_d, parse_ravdess
from cnn_features.errors import InvalidInput


def test_ravdess_name_gives_emotion_and_actor() -> None:
    """A RAVDESS name yields the emotion of its third field and the actor of its last."""
    label = parse_ravdess("Actor_12/03-01-05-02-01-02-12.npy")
    assert (label.emotion, label.actor) == ("angry", "12")
    assert label.clip_id == "01-05-02-01-02-12"


@pytest.mark.parametrize(
    ("rel", "words"),
    [
        ("Actor_01/03-01-09-01-01-01-01.npy", "does not follow RAVDESS"),
        ("Actor_01/03-01-01-01-01-01.npy", "does not follow RAVDESS"),
        ("Actor_02/03-01-01-01-01-01-01.npy", "not 'Actor_01'"),
        ("03-01-01-01-01-01-01.npy", "not 'Actor_01'"),
        ("Actor_01/03-01-01-01-01-01-01.wav", "does not follow RAVDESS"),
    ],
)
def test_ravdess_bad_names_are_reported_not_guessed(rel: str, words: str) -> None:
    """Names outside the RAVDESS scheme, or in the wrong actor folder, raise naming the file."""
    with pytest.raises(InvalidInput, match=words) as info:
        parse_ravdess(rel)
    assert rel in str(info.value)


def test_crema_d_name_gives_emotion_and_actor() -> None:
    """A CREMA-D name maps its emotion code to the shared emotion names."""
    label = parse_crema_d("1091_IEO_FEA_HI.npy")
    assert (label.emotion, label.actor, label.clip_id) == ("fearful", "1091", "1091_IEO_FEA_HI")


@pytest.mark.parametrize("rel", ["1001_DFA_XXX_XX.npy", "101_DFA_ANG_XX.npy", "1001_DFA_ANG_ZZ.npy", "sub/1001_DFA_ANG_XX.npy"])
def test_crema_d_bad_names_are_reported(rel: str) -> None:
    """Unknown emotion or level codes, short actor ids and sub-folders are rejected."""
    with pytest.raises(InvalidInput, match="CREMA-D"):
        parse_crema_d(rel)


def test_unknown_dataset_names_the_known_ones() -> None:
    """Asking for an unknown layout lists the known ones."""
    with pytest.raises(InvalidInput, match="crema_d, ravdess"):
        get_dataset("iemocap")


def test_label_all_rejects_non_npy_unparsable_and_duplicates() -> None:
    """Each rejected file gets its reason; the first of two identical takes is kept."""
    files = [
        "Actor_01/01-01-01-01-01-01-01.npy",
        "Actor_01/03-01-01-01-01-01-01.npy",
        "Actor_01/03-01-02-01-01-01-01.npy",
        "Actor_01/readme.md",
        "Actor_01/take3.npy",
    ]
    labels, rejected = label_all(DATASETS["ravdess"], files)
    assert sorted(labels) == ["Actor_01/01-01-01-01-01-01-01.npy", "Actor_01/03-01-02-01-01-01-01.npy"]
    assert "duplicate clip id" in rejected["Actor_01/03-01-01-01-01-01-01.npy"]
    assert "not a .npy file" in rejected["Actor_01/readme.md"]
    assert "does not follow RAVDESS" in rejected["Actor_01/take3.npy"]
