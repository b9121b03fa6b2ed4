"""training/ferplus.py: FER+ votes onto our labels, the official majority rule and the training targets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from serenbox.device.labels import LABELS
from serenbox.training import ferplus
from serenbox.training.fer2013 import SPLITS, DatasetError, load

from tests.conftest import SHARED
from tests.tinymodels import make_dataset, write_npz

# FER+ column order: neutral, happiness, surprise, sadness, anger, disgust, fear, contempt, unknown, NF.
VOTES = np.array(
    [
        [6, 4, 0, 0, 0, 0, 0, 0, 0, 0],  # 0 neutral 6 of 10: neutral
        [5, 5, 0, 0, 0, 0, 0, 0, 0, 0],  # 1 a 5/5 tie: no majority
        [4, 3, 1, 1, 1, 0, 0, 0, 0, 0],  # 2 singles dropped: 4 of 7 neutral is a majority
        [0, 2, 0, 0, 0, 0, 0, 6, 2, 0],  # 3 contempt majority
        [0, 4, 0, 0, 0, 0, 0, 3, 3, 0],  # 4 happiness 4 of 10 without majority; 4 of 7 if contempt votes go
        [0, 0, 0, 0, 0, 0, 0, 0, 7, 3],  # 5 unknown
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 10],  # 6 not a face
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # 7 no FER+ label
        [0, 0, 2, 0, 0, 0, 6, 0, 0, 2],  # 8 fear 6 of 10
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # 9 all singles: nothing left
        [0, 0, 0, 0, 3, 2, 0, 0, 5, 0],  # 10 unknown on top, anger second
        [0, 0, 0, 3, 0, 0, 0, 0, 3, 4],  # 11 NF on top
        [0, 0, 0, 4, 0, 0, 0, 0, 4, 2],  # 12 a sadness/unknown tie goes to sadness (first column)
    ],
    dtype=np.uint8,
)
L = {name: LABELS.index(name) for name in LABELS}


def test_columns_map_onto_our_labels() -> None:
    mapped = [LABELS[i] for i in ferplus.TO_LABEL]
    assert mapped == ["neutral", "happy", "surprise", "sad", "angry", "disgust", "fear"]


def test_official_majority_rule_on_hand_made_votes() -> None:
    keep, labels = ferplus.majority(VOTES)
    assert np.flatnonzero(keep).tolist() == [0, 2, 8]
    assert labels.tolist() == [L["neutral"], -1, L["neutral"], -1, -1, -1, -1, -1, L["fear"], -1, -1, -1, -1]
    # With contempt votes removed before the rule, row 4's happiness has 4 of 7 votes.
    keep_v, labels_v = ferplus.majority(VOTES, contempt="vote")
    assert np.flatnonzero(keep_v).tolist() == [0, 2, 4, 8]
    assert labels_v[4] == L["happy"]


def test_majority_targets_are_one_hot_of_the_rule() -> None:
    keep, y = ferplus.targets(VOTES, "majority")
    assert np.flatnonzero(keep).tolist() == [0, 2, 8]
    expected = np.zeros((len(VOTES), 7), np.float32)
    expected[0, L["neutral"]] = expected[2, L["neutral"]] = expected[8, L["fear"]] = 1.0
    assert np.array_equal(y, expected)


def _row(**shares: float) -> np.ndarray:
    out = np.zeros(7, np.float32)
    for name, share in shares.items():
        out[L[name]] = share
    return out


def test_distribution_targets_drop_singles_unclear_images_and_contempt_per_policy() -> None:
    for mode in ("crossentropy", "probability"):
        keep, y = ferplus.targets(VOTES, mode)  # contempt='image': images with contempt votes go
        assert np.flatnonzero(keep).tolist() == [0, 1, 2, 8, 12]
        assert np.allclose(y[0], _row(neutral=0.6, happy=0.4))
        assert np.allclose(y[1], _row(neutral=0.5, happy=0.5))
        assert np.allclose(y[2], _row(neutral=4 / 7, happy=3 / 7))  # the three single votes are gone
        assert np.allclose(y[8], _row(surprise=0.25, fear=0.75))  # NF votes removed, not spread
        assert np.allclose(y[12], _row(sad=1.0))
        assert not y[~keep].any()
    keep, y = ferplus.targets(VOTES, "crossentropy", contempt="vote")
    assert np.flatnonzero(keep).tolist() == [0, 1, 2, 3, 4, 8, 12]
    assert np.allclose(y[3], _row(happy=1.0)) and np.allclose(y[4], _row(happy=1.0))


def test_bad_mode_or_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="mode 'vote'"):
        ferplus.targets(VOTES, "vote")
    with pytest.raises(ValueError, match="contempt policy 'keep'"):
        ferplus.majority(VOTES, contempt="keep")


def test_sampled_labels_follow_the_distribution() -> None:
    shares = np.tile(_row(neutral=0.6, happy=0.3, fear=0.1), (20000, 1))
    drawn = ferplus.sample_labels(shares, np.random.default_rng(0))
    assert drawn.shape == shares.shape and np.array_equal(drawn.sum(1), np.ones(len(shares)))
    freq = drawn.mean(0)
    assert np.allclose(freq, shares[0], atol=0.015)
    one = ferplus.sample_labels(np.array([_row(sad=1.0)]), np.random.default_rng(1))
    assert one.argmax() == L["sad"]


def test_attach_reads_aligned_votes_and_refuses_bad_files(tmp_path: Path) -> None:
    data = load(write_npz(make_dataset({"Training": 2, "PublicTest": 1, "PrivateTest": 1}), tmp_path / "d.npz"))
    votes = np.zeros((len(data), 10), np.uint8)
    votes[:, 0] = 10
    np.savez(tmp_path / "ferplus.npz", votes=votes, has_label=np.ones(len(data), bool))
    assert ferplus.default_path(tmp_path / "d.npz") == tmp_path / "ferplus.npz"
    with_votes = ferplus.attach(data, tmp_path / "ferplus.npz")
    assert np.array_equal(with_votes.votes, votes)
    assert with_votes.split("PublicTest").votes.shape == (7, 10)
    official = ferplus.official(with_votes.split("PrivateTest"))
    assert len(official) == 7 and set(official.labels.tolist()) == {L["neutral"]}

    np.savez(tmp_path / "short.npz", votes=votes[:-1])
    np.savez(tmp_path / "wide.npz", votes=votes[:, :8])
    np.savez(tmp_path / "other.npz", x=votes)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    cases = {
        "missing.npz": "FER+ votes file does not exist",
        "short.npz": f"{len(data) - 1} rows of votes for {len(data)} images; not aligned",
        "wide.npz": "votes must be (N, 10)",
        "other.npz": "not a FER+ archive",
        "junk.npz": "not a readable .npz archive",
    }
    for name, needle in cases.items():
        with pytest.raises(DatasetError, match=None) as e:
            ferplus.attach(data, tmp_path / name)
        message = str(e.value)
        assert message.startswith(str(tmp_path / name)) and needle in message and "\n" not in message


@pytest.mark.shared
def test_official_rule_gives_the_published_set_sizes() -> None:
    path = SHARED / "fer2013" / "ferplus.npz"
    if not path.is_file():
        pytest.skip("../shared/fer2013/ferplus.npz is absent")
    data = ferplus.attach(load(SHARED / "fer2013" / "fer2013.npz"), path)
    keep, labels = ferplus.majority(data.votes)
    sizes = {s: int((keep & (data.splits == i)).sum()) for i, s in enumerate(SPLITS)}
    assert sizes == {"Training": 24940, "PublicTest": 3186, "PrivateTest": 3136}
    assert labels[keep].min() >= 0 and labels[keep].max() < len(LABELS)
