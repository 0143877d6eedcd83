"""Model bundle: write -> load round trip, and refusal of bundles that do not match."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from screener.pipeline.bundle import BundleError, ModelBundle, write_bundle
from screener.pipeline.landmarks import LandmarkNet
from screener.pipeline.model import MultiRoiConfig, MultiRoiNet
from screener.pipeline.rois import ROI_NAMES
from screener.pipeline.tscore import ReferenceTable


def make_bundle(path: Path, demo: bool = False) -> tuple[Path, MultiRoiNet]:
    torch.manual_seed(0)
    net = MultiRoiNet(MultiRoiConfig(backbone="resnet18", roi_size=32)).eval()
    net.target_mean.fill_(0.95)
    write_bundle(
        path, name="test-bmd", version="1.2.3", intended_use="tests", demo=demo,
        demo_statement="demo labels" if demo else "", landmark_net=LandmarkNet(width=16),
        landmark_input_size=64, landmark_width=16, bmd_nets=[net], table=ReferenceTable.default(),
        training_data={"cases": 0}, validation={"note": "none"},
    )
    return path, net


def test_round_trip_keeps_predictions_and_manifest(tmp_path: Path) -> None:
    path, net = make_bundle(tmp_path / "b")
    bundle = ModelBundle.load(path)
    assert bundle.name == "test-bmd" and bundle.version == "1.2.3" and not bundle.demo
    assert bundle.roi_size == 32 and bundle.landmark_input_size == 64
    assert bundle.model_id.startswith("test-bmd@1.2.3+")
    x = torch.randn(2, 7, 32, 32)
    with torch.no_grad():
        expected = net(x).final
        got = bundle.bmd(x, ROI_NAMES)
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)  # weights stored as float16
    assert bundle.table == ReferenceTable.default()


def test_model_id_is_stable_and_tracks_weights(tmp_path: Path) -> None:
    a = ModelBundle.load(make_bundle(tmp_path / "a")[0]).model_id
    assert ModelBundle.load(tmp_path / "a").model_id == a
    torch.manual_seed(1)
    net = MultiRoiNet(MultiRoiConfig(backbone="resnet18", roi_size=32))
    write_bundle(tmp_path / "c", name="test-bmd", version="1.2.3", intended_use="t", demo=False,
                 landmark_net=LandmarkNet(width=16), landmark_input_size=64, landmark_width=16,
                 bmd_nets=[net], table=ReferenceTable.default(), training_data={}, validation={})
    assert ModelBundle.load(tmp_path / "c").model_id != a


def _edit_manifest(path: Path, edit) -> None:
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(format="other/9"), "format"),
        (lambda m: m["landmarks"].update(scheme="cxr99"), "landmarks.scheme"),
        (lambda m: m["landmarks"]["names"].reverse(), "landmarks.names"),
        (lambda m: m["rois"].update(recipe="other"), "rois.recipe"),
        (lambda m: m["outputs"].update(unit="mg/cm3"), "outputs"),
        (lambda m: m.pop("intended_use"), "intended_use"),
        (lambda m: m.update(demo=True, demo_statement=""), "demo_statement"),
        (lambda m: m["bmd"]["models"][0]["config"].update(backbone="vgg16"), "bmd.models"),
        (lambda m: m["bmd"]["models"][0]["config"].update(roi_size=64), "roi_size"),
        (lambda m: m["bmd"]["models"][0].update(weights="../../etc/passwd"), "outside the bundle"),
        (lambda m: m["landmarks"].pop("width"), "landmarks.width"),
        (lambda m: m["bmd"].update(models=["x"]), "must be an object"),
    ],
)
def test_mismatched_manifest_is_refused_naming_the_key(tmp_path: Path, edit, message) -> None:
    path, _ = make_bundle(tmp_path / "b")
    _edit_manifest(path, edit)
    with pytest.raises(BundleError, match=message):
        ModelBundle.load(path)


@pytest.mark.parametrize(
    "edit",
    [lambda m: m.update(demo=True, demo_statement="now a demo"), lambda m: m["rois"]["names"].reverse(),
     lambda m: m["bmd"]["models"][0]["config"]["rois"].reverse(), lambda m: m["landmarks"].update(input_size=128)],
)
def test_any_result_shaping_edit_changes_the_model_id(tmp_path: Path, edit) -> None:
    path, _ = make_bundle(tmp_path / "b")
    before = ModelBundle.load(path).model_id
    _edit_manifest(path, edit)
    try:
        after = ModelBundle.load(path).model_id
    except BundleError:
        return  # refused outright is also fine
    assert after != before


def test_a_detector_with_extent_points_round_trips_with_its_rule(tmp_path: Path) -> None:
    from screener.pipeline.landmarks import EXTENT_POINTS, EXTENT_RULE

    torch.manual_seed(0)
    net = MultiRoiNet(MultiRoiConfig(backbone="resnet18", roi_size=32)).eval()
    common = dict(name="x", version="1", intended_use="t", demo=False, landmark_input_size=64, landmark_width=16,
                  bmd_nets=[net], table=ReferenceTable.default(), training_data={}, validation={})
    write_bundle(tmp_path / "e", landmark_net=LandmarkNet(width=16, extent_points=True),
                 extent_rule={"lung_extent": 1.0, "ribcage_rows": 0.25}, **common)
    bundle = ModelBundle.load(tmp_path / "e")
    assert bundle.landmark_net.extent_points and bundle.manifest["landmarks"]["extent_points"] == list(EXTENT_POINTS)
    assert bundle.detector().extent_rule == {"lung_extent": 1.0, "ribcage_rows": 0.25}
    write_bundle(tmp_path / "d", landmark_net=LandmarkNet(width=16, extent_points=True), **common)
    assert ModelBundle.load(tmp_path / "d").detector().extent_rule == dict(EXTENT_RULE)
    assert ModelBundle.load(tmp_path / "d").model_id != bundle.model_id  # the rule shapes every result
    with pytest.raises(BundleError, match="no extent points"):
        write_bundle(tmp_path / "n", landmark_net=LandmarkNet(width=16), extent_rule=dict(EXTENT_RULE), **common)
    for edit, message in ((lambda m: m["landmarks"]["extent_points"].reverse(), "landmarks.extent_points"),
                          (lambda m: m["landmarks"].pop("extent_points"), "landmarks.extent_rule"),
                          (lambda m: m["landmarks"].pop("extent_rule"), "landmarks.extent_rule is not"),
                          (lambda m: m["landmarks"]["extent_rule"].update(lung_extent=2), "landmarks.extent_rule")):
        write_bundle(tmp_path / "e", landmark_net=LandmarkNet(width=16, extent_points=True), **common)
        _edit_manifest(tmp_path / "e", edit)
        with pytest.raises(BundleError, match=message):
            ModelBundle.load(tmp_path / "e")


def test_edited_tscore_table_is_refused(tmp_path: Path) -> None:
    path, _ = make_bundle(tmp_path / "b")
    text = (path / "tscore_reference.csv").read_text().replace("0.106", "0.206")
    (path / "tscore_reference.csv").write_text(text)
    with pytest.raises(BundleError, match="tscore_table.sha256"):
        ModelBundle.load(path)


def test_damaged_weights_are_refused(tmp_path: Path) -> None:
    path, _ = make_bundle(tmp_path / "b")
    data = bytearray((path / "bmd_0.pt").read_bytes())
    data[-100] ^= 0xFF
    (path / "bmd_0.pt").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        ModelBundle.load(path)


def test_missing_bundle_and_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="manifest.json not found"):
        ModelBundle.load(tmp_path)
    path, _ = make_bundle(tmp_path / "b")
    (path / "landmarks.pt").unlink()
    with pytest.raises(BundleError, match="landmarks.weights"):
        ModelBundle.load(path)


def test_demo_bundle_needs_statement(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="demo_statement"):
        write_bundle(tmp_path, name="x", version="1", intended_use="t", demo=True, landmark_net=LandmarkNet(width=16),
                     landmark_input_size=64, landmark_width=16, bmd_nets=[MultiRoiNet(MultiRoiConfig(backbone="resnet18", roi_size=32))],
                     table=ReferenceTable.default(), training_data={}, validation={})


def test_shipped_demo_bundle_loads_and_says_demo() -> None:
    bundle = ModelBundle.load()
    assert bundle.demo and "NOT FOR CLINICAL USE" in bundle.manifest["demo_statement"]
    assert bundle.manifest["validation"]["landmarks"]["mre_mm"] > 0
    size_mb = sum(f.stat().st_size for f in bundle.path.iterdir()) / 1e6
    assert size_mb < 40, f"demo bundle is {size_mb:.1f} MB: too big for the wheel"


def test_the_shipped_bundle_exports_again_with_mirrored_views_and_a_matching_gate_table(tmp_path: Path, capsys) -> None:
    """`screener-train export` from the shipped bundle's own weights (landmarks.pt, view.pt and
    --bmd-bundle): the mirrored views enter the manifest and the model id, and a gate table
    calibrated with another setting is refused."""
    from screener.pipeline.bundle import demo_bundle_path
    from training.cli import main as train_main

    demo = demo_bundle_path()
    common = ["export", "--landmarks", str(demo / "landmarks.pt"), "--bmd-bundle", str(demo),
              "--view", str(demo / "view.pt"), "--name", "cxr-bmd-demo", "--version", "9.9.9", "--demo",
              "--intended-use", "test", "--landmark-flip"]
    gate = tmp_path / "gate.json"
    gate.write_text(json.dumps({"accepted_share": {"frontal": 1.0}, "threshold": 0.1, "view_threshold": 0.5, "flip": False}))
    assert train_main([*common, "--out", str(tmp_path / "refused"), "--gate-calibration", str(gate)]) == 2
    assert "calibrate again" in capsys.readouterr().err and not (tmp_path / "refused" / "manifest.json").exists()
    gate.write_text(json.dumps({"accepted_share": {"frontal": 1.0}, "threshold": 0.1, "view_threshold": 0.5, "flip": True}))
    assert train_main([*common, "--out", str(tmp_path / "flip"), "--gate-calibration", str(gate)]) == 0
    again, shipped = ModelBundle.load(tmp_path / "flip"), ModelBundle.load()
    assert again.detector().flip is True and shipped.detector().flip is False
    assert again.manifest["validation"]["gate"]["flip"] is True
    for a, b in zip(again.landmark_net.state_dict().values(), shipped.landmark_net.state_dict().values()):
        assert torch.equal(a, b)  # the same weights, re-exported
    assert again.manifest["view"]["sha256"] == shipped.manifest["view"]["sha256"]
