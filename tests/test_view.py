"""The gate's view classifier: its check and reasons, its place in the bundle, its training
and cross-validation, and the shipped classifier on negatives made from a real CR."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from screener.codes import ReasonCode
from screener.pipeline.bundle import BundleError, ModelBundle, write_bundle
from screener.pipeline.eligibility import EligibilityRules, check_film, check_view
from screener.pipeline.landmarks import LandmarkNet, Landmarks
from screener.pipeline.model import MultiRoiConfig, MultiRoiNet
from screener.pipeline.tscore import ReferenceTable
from screener.pipeline.view import VIEW_KINDS, ViewClassifier, ViewNet, ViewScores, check_view_kinds
from tests.support.common import synthetic_contours, synthetic_film
from tests.test_gate import detector, rg1  # noqa: F401  (the gate tests' fixtures: the demo detector, the decoded RG1)
from training.jsrt import landmarks_from_contours


def _scores(**p: float) -> ViewScores:
    rest = 1.0 - sum(p.values())
    probs = [p.get(k, rest / (len(VIEW_KINDS) - len(p))) for k in VIEW_KINDS]
    return ViewScores(tuple(probs))


def _landmarks(view: ViewScores | None, confidence: float = 0.6) -> Landmarks:
    pts = landmarks_from_contours(synthetic_contours())
    return Landmarks(points=pts, confidence=np.full(16, confidence), view=view)


def test_the_view_check_refuses_by_the_likeliest_kind_and_names_it() -> None:
    assert check_view(_landmarks(None)).eligible  # a bundle without a classifier: no check
    assert check_view(_landmarks(_scores(frontal=0.9))).eligible
    mirrored = check_view(_landmarks(_scores(frontal=0.2, mirrored=0.7)))
    assert mirrored.code == ReasonCode.MIRRORED and "flipped left to right" in mirrored.reason and "0.20" in mirrored.reason
    upper = check_view(_landmarks(_scores(frontal=0.1, upper_half=0.8)))
    assert upper.code == ReasonCode.NOT_FRONTAL_CHEST and "upper half (0.80)" in upper.reason
    assert check_view(_landmarks(_scores(frontal=0.2, mirrored=0.7)), EligibilityRules(min_view_frontal_probability=0.0)).eligible
    with pytest.raises(ValueError, match="min_view_frontal_probability"):
        EligibilityRules(min_view_frontal_probability=1.5)
    with pytest.raises(ValueError, match="probabilities"):
        ViewScores((0.5, 0.5))


def test_the_view_check_comes_last_so_a_film_keeps_its_most_specific_reason() -> None:
    film = synthetic_film(heart=True)
    lm = _landmarks(_scores(frontal=0.05, mirrored=0.9))
    assert check_film(film, lm).code == ReasonCode.MIRRORED  # every other check passed
    low = _landmarks(_scores(frontal=0.05, mirrored=0.9), confidence=0.01)
    assert check_film(film, low).code == ReasonCode.LOW_LANDMARK_CONFIDENCE


def test_view_net_keeps_the_layout_and_any_input_size() -> None:
    net = ViewNet(width=8).eval()
    for size in (128, 96):
        assert net(torch.zeros(2, 1, size, size)).shape == (2, len(VIEW_KINDS))
    scores = ViewClassifier(net, 64).classify([np.random.default_rng(0).random((300, 200), dtype=np.float32)] * 2)
    assert len(scores) == 2 and sum(scores[0].probabilities) == pytest.approx(1.0)
    assert scores[0] == scores[1] and ViewClassifier(net).classify([]) == []
    with pytest.raises(ValueError, match="in that order"):
        check_view_kinds(list(reversed(VIEW_KINDS)))


def _bundle(path: Path, view_net: ViewNet | None) -> Path:
    torch.manual_seed(0)
    return write_bundle(path, name="v", version="1", intended_use="t", demo=False, landmark_net=LandmarkNet(width=16),
                        landmark_input_size=64, landmark_width=16,
                        bmd_nets=[MultiRoiNet(MultiRoiConfig(backbone="resnet18", roi_size=32)).eval()],
                        table=ReferenceTable.default(), training_data={}, validation={}, view_net=view_net, view_input_size=64)


def test_a_bundle_carries_its_view_classifier_and_refuses_a_damaged_one(tmp_path: Path) -> None:
    torch.manual_seed(3)
    view = ViewNet(width=8).eval()
    with_view = ModelBundle.load(_bundle(tmp_path / "v", view))
    without = ModelBundle.load(_bundle(tmp_path / "n", None))
    assert without.view_net is None and without.detector().view is None and "view" not in without.manifest
    assert with_view.manifest["view"]["kinds"] == list(VIEW_KINDS) and with_view.manifest["view"]["input_size"] == 64
    assert with_view.model_id != without.model_id  # the classifier decides which films get numbers
    film = synthetic_film(heart=True)
    got = with_view.detector().detect([film])[0].view
    want = ViewClassifier(view, 64).classify([film])[0]
    np.testing.assert_allclose(got.probabilities, want.probabilities, atol=2e-3)  # stored as float16
    # a bundle's view.pt loads back as a checkpoint (to export the bundle again with it)
    from training.view import load_view_checkpoint

    again, config = load_view_checkpoint(tmp_path / "v" / "view.pt")
    assert (config.width, config.input_size) == (8, 64)
    np.testing.assert_allclose(ViewClassifier(again, 64).classify([film])[0].probabilities, got.probabilities, atol=1e-6)
    with pytest.raises(ValueError, match="not the view classifier"):
        load_view_checkpoint(_bundle(tmp_path / "n", None) / "landmarks.pt")
    m = json.loads((tmp_path / "v" / "manifest.json").read_text())
    m["view"]["kinds"] = m["view"]["kinds"][::-1]
    (tmp_path / "v" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="view.kinds"):
        ModelBundle.load(tmp_path / "v")
    _bundle(tmp_path / "v", view)
    (tmp_path / "v" / "view.pt").write_bytes(b"0" * 100)
    with pytest.raises(BundleError, match="view.sha256"):
        ModelBundle.load(tmp_path / "v")


def test_a_bundle_without_a_view_classifier_keeps_the_model_id_it_had_before_the_key_existed() -> None:
    """The id formula before the view key: a hash over the same keys, none of them "view"."""
    import hashlib

    from screener.pipeline.bundle import IDENTITY_KEYS, model_id_of

    manifest = {k: v for k, v in ModelBundle.load().manifest.items() if k != "view"}
    before = json.dumps({k: manifest.get(k) for k in IDENTITY_KEYS if k != "view"}, sort_keys=True, separators=(",", ":"))
    assert model_id_of(manifest) == f"{manifest['name']}@{manifest['version']}+{hashlib.sha256(before.encode()).hexdigest()[:12]}"
    assert model_id_of({**manifest, "view": {"weights": "view.pt"}}) != model_id_of(manifest)


@pytest.mark.parametrize("key, value", [("width", 0), ("width", "16"), ("input_size", 16), ("input_size", True)])
def test_a_bundle_with_an_unusable_view_size_is_refused_naming_the_key(tmp_path: Path, key: str, value: object) -> None:
    path = _bundle(tmp_path / "v", ViewNet(width=8))
    m = json.loads((path / "manifest.json").read_text())
    m["view"][key] = value
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=f"view.{key}"):
        ModelBundle.load(path)


def test_the_heart_side_check_is_more_lenient_only_with_a_classifier_behind_it() -> None:
    film = synthetic_film(heart=True)
    strict = EligibilityRules(min_heart_side_contrast=0.99, min_heart_side_contrast_with_view=-1.0)
    assert check_film(film, _landmarks(None), strict).code == ReasonCode.HEART_ON_IMAGE_LEFT
    assert check_film(film, _landmarks(_scores(frontal=0.9)), strict).eligible
    assert EligibilityRules().min_heart_side_contrast >= 0.0 > EligibilityRules().min_heart_side_contrast_with_view
    nan = check_view(_landmarks(ViewScores(tuple([float("nan")] * len(VIEW_KINDS)))))
    assert nan.code == ReasonCode.NOT_FRONTAL_CHEST and "finite" in nan.reason


def test_the_shipped_view_classifier_accepts_the_real_cr_and_refuses_it_mirrored_or_cut(detector, rg1) -> None:
    """The demo bundle's classifier on a film from a vendor it was never trained on."""
    from training.landmarks import make_negative

    assert detector.view is not None, "the demo bundle ships a view classifier"
    assert detector.detect([rg1])[0].view.frontal >= EligibilityRules().min_view_frontal_probability
    # the checks before it switched off: the whole gate refuses them on the classifier's evidence alone
    off = EligibilityRules(min_heart_side_contrast_with_view=-1.0, min_thorax_aspect=0.01, min_roi_landmark_confidence=0.0,
                           min_landmark_confidence=0.0, max_turned_confidence_ratio=100.0, min_mediastinum_contrast=-1.0,
                           min_roi_inside=0.0)
    for kind, code in (("mirrored", ReasonCode.MIRRORED), ("upper_half", ReasonCode.NOT_FRONTAL_CHEST)):
        probe = make_negative(rg1, kind, np.random.default_rng(0))
        decision = check_film(probe, detector.detect([probe])[0], off)
        assert decision.code == code, (kind, decision)
    # and the detector without it, as BMD training crops ROIs with
    assert ModelBundle.load().detector(with_view=False).detect([rg1])[0].view is None
