"""Short real training runs on tiny generated data: the loss falls, runs resume, CLI errors are clear."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.common import synthetic_contours
from training.jsrt import landmarks_from_contours


def draw_chest(contours: dict[str, np.ndarray], rng: np.random.Generator, brightness: float = 0.5) -> np.ndarray:
    from matplotlib.path import Path as PolyPath

    yy, xx = np.mgrid[:512, :512]
    pts = np.column_stack([xx.ravel(), yy.ravel()])
    img = np.full(512 * 512, brightness)
    for key, value in (("RL", 0.15), ("LL", 0.15), ("H", 0.8), ("RCLA", 0.95), ("LCLA", 0.95)):
        img[PolyPath(contours[key]).contains_points(pts)] = value
    img = img.reshape(512, 512) + rng.normal(0, 0.02, (512, 512))
    return np.clip(img, 0, 1)


@pytest.fixture
def tiny_site(tmp_path: Path) -> Path:
    """12 radiograph-like PNGs whose bone brightness tracks BMD, with a manifest."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(12):
        shift = tuple(rng.uniform(-20, 20, 2))
        c = synthetic_contours(shift)
        bmd = 0.6 + 0.05 * i
        img = draw_chest(c, rng, brightness=0.3 + 0.4 * (bmd - 0.6))
        Image.fromarray((img * 255).astype(np.uint8)).save(tmp_path / "img" / f"{i}.png")
        lm = landmarks_from_contours(c)
        rows.append([f"img/{i}.png", bmd, bmd * 1.05, bmd * 1.08, bmd * 1.07, "F" if i % 2 else "M", 60, f"p{i}",
                     " ".join(f"{v:.2f}" for v in lm.ravel())])
    with (tmp_path / "manifest.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "L1", "L2", "L3", "L4", "sex", "age", "patient_id", "landmarks"])
        w.writerows(rows)
    return tmp_path / "manifest.csv"


@pytest.mark.slow
def test_bmd_training_lowers_loss_and_resumes(tiny_site: Path, tmp_path: Path) -> None:
    from training.bmd import BmdTrainConfig, train_bmd

    cfg = BmdTrainConfig(manifest=str(tiny_site), out_dir=str(tmp_path / "run"), backbone="resnet18", roi_size=32,
                         optimizer="adamw", lr=1e-3, weight_decay=0.0, batch_size=4, epochs=2, val_fraction=0.25)
    first = train_bmd(cfg)
    cfg.epochs = 6
    result = train_bmd(cfg, resume=True)
    losses = [h["train_loss"] for h in result["history"]]
    assert len(losses) == 6 and result["history"][:2] == first["history"]
    assert np.mean(losses[-2:]) < losses[0]
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "crops.pt").is_file()


def test_bmd_evaluate_writes_metrics_table_and_plots(tiny_site: Path, tmp_path: Path) -> None:
    from training.bmd import BmdTrainConfig, evaluate_bmd, train_bmd

    cfg = BmdTrainConfig(manifest=str(tiny_site), out_dir=str(tmp_path / "run"), backbone="resnet18", roi_size=32,
                         optimizer="adamw", lr=1e-3, batch_size=4, epochs=1, val_fraction=0.5)
    train_bmd(cfg)
    ckpt = str(tmp_path / "run" / "best.pt")
    metrics = evaluate_bmd([ckpt, ckpt], str(tiny_site), str(tmp_path / "eval"))  # an ensemble of two
    assert len(metrics["models"]) == 2 and metrics["n"] > 0
    for name in ("metrics.json", "table.txt", "scatter.png", "roc.png", "bland_altman.png", "calibration.png", "predictions.csv"):
        assert (tmp_path / "eval" / name).stat().st_size > 0, name
    assert "L1-L4" in (tmp_path / "eval" / "table.txt").read_text()


@pytest.fixture
def tiny_jsrt(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    root = tmp_path / "jsrt"
    (root / "images").mkdir(parents=True)
    contours, clinical = {}, ["id,sex,age,condition"]
    for i in range(10):
        c = synthetic_contours(tuple(rng.uniform(-30, 30, 2)))
        cid = f"JPCX{i:03d}"
        Image.fromarray((draw_chest(c, rng) * 255).astype(np.uint8)).save(root / "images" / f"{cid}.png")
        contours[cid] = {k: v.tolist() for k, v in c.items()}
        clinical.append(f"{cid},F,60,normal")
    (root / "landmarks.json").write_text(json.dumps({"coordinate_space": "512x512", "images": contours}))
    (root / "clinical.csv").write_text("\n".join(clinical) + "\n")
    return root


@pytest.mark.slow
def test_landmark_training_lowers_loss_resumes_and_evaluates(tiny_jsrt: Path, tmp_path: Path) -> None:
    from training.landmarks import LandmarkTrainConfig, evaluate_landmarks, train_landmarks

    cfg = LandmarkTrainConfig(jsrt_root=str(tiny_jsrt), out_dir=str(tmp_path / "lm"), input_size=64, width=16,
                              epochs=4, batch_size=4, lr=3e-3)
    train_landmarks(LandmarkTrainConfig(**{**cfg.__dict__, "epochs": 4}))
    history = json.loads((tmp_path / "lm" / "history.json").read_text())
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    metrics = evaluate_landmarks(tmp_path / "lm" / "best.pt", tmp_path / "eval")
    assert set(metrics["per_landmark_mm"]) and metrics["mre_mm"] > 0
    assert (tmp_path / "eval" / "landmarks_validation.png").stat().st_size > 0
    resumed = train_landmarks(cfg, resume=True)  # already at its last epoch: nothing more to do
    assert len(resumed["history"]) == 4


def test_manifest_errors_name_line_and_column(tiny_site: Path, tmp_path: Path) -> None:
    from training.bmd import read_manifest

    text = tiny_site.read_text().splitlines()
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join([text[0], text[1].replace(",F,", ",X,").replace(",M,", ",X,")]) + "\n")
    bad.write_text(bad.read_text().replace("img/", str(tiny_site.parent / "img") + "/"))
    with pytest.raises(ValueError, match=r"bad.csv:2: column sex"):
        read_manifest(bad)
    bad.write_text("image,L1,L2\nx.png,1,1\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['L3', 'L4'\]"):
        read_manifest(bad)
    bad.write_text(text[0] + "\n" + text[1].replace(",0.6,", ",600,", 1).replace("img/", str(tiny_site.parent / "img") + "/") + "\n")
    with pytest.raises(ValueError, match="g/cm2"):
        read_manifest(bad)


def test_split_is_by_patient_and_deterministic() -> None:
    from training.bmd import ManifestRow, assign_split

    rows = [ManifestRow(Path(f"{i}.png"), (1, 1, 1, 1), "F", 60, f"patient{i // 3}", None) for i in range(300)]
    splits = [assign_split(r, 0.2) for r in rows]
    for i in range(0, 300, 3):  # all images of one patient fall on the same side
        assert len(set(splits[i : i + 3])) == 1
    assert 0.1 < splits.count("val") / 300 < 0.3
    assert splits == [assign_split(r, 0.2) for r in rows]
    assert assign_split(ManifestRow(Path("x"), (1, 1, 1, 1), None, None, "p", "test"), 0.2) == "test"


def test_demo_labels_follow_age_and_sex() -> None:
    from training.demo_labels import demo_bmd

    assert demo_bmd(30, "F").mean() == pytest.approx(1.064)
    assert demo_bmd(30, "M").mean() == pytest.approx(1.057)
    assert demo_bmd(75, "F").mean() < demo_bmd(55, "F").mean() < demo_bmd(40, "F").mean()
    assert demo_bmd(75, "M").mean() > demo_bmd(75, "F").mean()
    l1, l2, l3, l4 = demo_bmd(50, "F")
    assert l1 < l2 < l3
    with pytest.raises(ValueError):
        demo_bmd(50, "")


def test_a_bundles_landmark_weights_load_for_evaluation_and_calibration() -> None:
    """`screener-train landmarks evaluate/calibrate --checkpoint <bundle>/landmarks.pt`: the
    shipped detector, its input size and width from the bundle's manifest."""
    import torch

    import screener.bundles
    from training.landmarks import load_landmark_checkpoint

    weights = Path(screener.bundles.__file__).parent / "demo" / "landmarks.pt"
    spec = json.loads((weights.parent / "manifest.json").read_text())["landmarks"]
    net, cfg = load_landmark_checkpoint(weights)
    assert (cfg.input_size, cfg.width) == (spec["input_size"], spec["width"])
    state = torch.load(weights, map_location="cpu", weights_only=True)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    # scored and calibrated as the bundle runs them: a --flip the bundle does not have is refused
    from training.landmarks import calibrate_confidence, evaluate_landmarks

    with pytest.raises(ValueError, match="without mirrored views"):
        evaluate_landmarks(weights, Path("/nonexistent"), flip=True)
    with pytest.raises(ValueError, match="export it with --landmark-flip"):
        calibrate_confidence(weights, Path("/nonexistent"), [], non_chest_files=[], flip=True)


def test_gate_negatives_are_what_they_say() -> None:
    from training.landmarks import NEGATIVES, make_negative

    img = np.random.default_rng(1).random((40, 30)).astype(np.float32)
    rng = np.random.default_rng(0)
    leg = np.linspace(0, 1, 50 * 20, dtype=np.float32).reshape(50, 20)
    made = {k: make_negative(img, k, rng, non_chest=[leg]) for k in NEGATIVES}
    np.testing.assert_array_equal(made["mirrored"], img[:, ::-1])
    np.testing.assert_array_equal(made["rotated_180"], img[::-1, ::-1])
    assert made["lateral_like"].shape == img.shape and not np.allclose(made["lateral_like"], img)
    assert min(made["non_chest"].shape) >= 12 and set(np.unique(made["non_chest"])) <= set(np.unique(leg))
    with pytest.raises(ValueError, match="non-chest radiographs"):
        make_negative(img, "non_chest", rng)
    np.testing.assert_array_equal(made["upside_down"], img[::-1])
    np.testing.assert_array_equal(made["rotated_270"], np.rot90(made["rotated_90"], 2))
    assert made["upper_half"].shape == made["lower_half"].shape == (20, 30)
    np.testing.assert_array_equal(np.vstack([made["upper_half"], made["lower_half"]]), img)
    with pytest.raises(ValueError, match="unknown negative kind"):
        make_negative(img, "sideways", rng)


def test_a_mirrored_training_input_carries_each_point_as_its_twin(tiny_jsrt: Path) -> None:
    from dataclasses import replace

    from screener.pipeline.landmarks import mirror_order
    from training.jsrt import load_jsrt
    from training.landmarks import LandmarkTrainConfig, make_batch, train_landmarks

    case = load_jsrt(tiny_jsrt)[0]
    image = np.random.default_rng(1).random((512, 512)).astype(np.float32)

    def mirrored(points: np.ndarray) -> np.ndarray:
        out = points[mirror_order(len(points))].copy()
        out[:, 0] = 511 - out[:, 0]
        return out

    both = mirrored(np.concatenate([case.landmarks, case.extent]))  # the 16, then the lungs' apex and base
    twin = replace(case, landmarks=both[:16], extent=both[16:])
    flipped_rng, plain_rng = np.random.default_rng(7), np.random.default_rng(7)
    plain_rng.random()  # the draw that decided to mirror
    x, y = make_batch([case], {case.case_id: image}, 64, 4, flipped_rng, extent_points=True, mirror=1.0)
    x2, y2 = make_batch([twin], {case.case_id: np.ascontiguousarray(image[:, ::-1])}, 64, 4, plain_rng, extent_points=True)
    np.testing.assert_allclose(x.numpy(), x2.numpy())
    np.testing.assert_allclose(y.numpy(), y2.numpy(), atol=1e-5)
    # the twins: the patient's right clavicle's medial end is still on the image's left
    assert y[0, 0, 0] < y[0, 3, 0]
    with pytest.raises(ValueError, match="mirror"):
        train_landmarks(LandmarkTrainConfig(jsrt_root=str(tiny_jsrt), mirror=1.5))


@pytest.mark.slow
def test_landmark_cross_validation_predicts_every_image_once_and_resumes(tiny_jsrt: Path, tmp_path: Path) -> None:
    from screener.pipeline.landmarks import LANDMARK_NAMES
    from screener.pipeline.landmarks import VIEWS
    from training.jsrt import load_jsrt
    from training.landmarks import CV_VARIANTS, FLIP_SUFFIX, LandmarkTrainConfig, cross_validate_landmarks

    cfg = LandmarkTrainConfig(jsrt_root=str(tiny_jsrt), out_dir=str(tmp_path / "cv"), input_size=64, width=16,
                              epochs=2, batch_size=4)
    partial = cross_validate_landmarks(cfg, folds=3, max_folds=2)
    assert partial["folds_done"] == [0, 1] and partial["n_images"] == 7  # folds of 4, 3, 3 images
    assert "2 of 3 folds" in (tmp_path / "cv" / "cv_metrics.txt").read_text()
    stamp = (tmp_path / "cv" / "fold0" / "best.pt").stat().st_mtime_ns
    assert cross_validate_landmarks(cfg, folds=3, max_folds=0)["folds_done"] == [0, 1]  # report only
    assert not (tmp_path / "cv" / "fold2").exists()
    full = cross_validate_landmarks(cfg, folds=3)
    assert full["folds_done"] == [0, 1, 2] and full["n_images"] == 10
    assert (tmp_path / "cv" / "fold0" / "best.pt").stat().st_mtime_ns == stamp  # a complete fold is not retrained
    assert set(full["variants"]) == ({name for name, *_ in CV_VARIANTS}
                                     | {name + FLIP_SUFFIX for name, *_ in CV_VARIANTS[1:]})
    saved = np.load(tmp_path / "cv" / "cv_predictions.npz")  # every view's raw points, plain then mirrored
    assert saved["views"].shape == (10, 2 * len(VIEWS), 16, 2) and saved["truth"].shape == (10, 16, 2)
    assert sorted(saved["ids"]) == sorted(c.case_id for c in load_jsrt(tiny_jsrt))
    for table in full["variants"].values():
        o = table["overall"]
        assert 0 < o["median"] <= o["p95"] and 0 <= o["within_10mm"] <= 1
        assert set(table["per_landmark"]) == set(LANDMARK_NAMES)
    assert (tmp_path / "cv" / "cv_errors.png").stat().st_size > 0


@pytest.mark.slow
def test_extent_points_train_report_their_rule_and_calibrate_by_the_folds_that_never_saw_each_film(
        tiny_jsrt: Path, tmp_path: Path) -> None:
    from training.landmarks import (
        CV_EXTENT_VARIANTS, NEGATIVES, RULE_SHARES, LandmarkTrainConfig, calibrate_confidence, cross_validate_landmarks,
        load_landmark_checkpoint, make_batch)
    from training.jsrt import load_jsrt

    cases = load_jsrt(tiny_jsrt)
    images = {c.case_id: np.zeros((512, 512), np.float32) for c in cases[:2]}
    x, y = make_batch(cases[:2], images, 64, 4, None, extent_points=True)
    assert x.shape == (2, 1, 64, 64) and y.shape == (2, 20, 2)
    # plain letterbox of a 512 px film at 64 px (pixel centres: crop = (p + 0.5) / 8 - 0.5), then stride 4
    expect = (np.stack([c.extent for c in cases[:2]]) + 0.5) / 8 - 0.5
    np.testing.assert_allclose(y[:, 16:].numpy(), (expect - 1.5) / 4, atol=1e-4)
    np.testing.assert_allclose(y[:, :16].numpy(), make_batch(cases[:2], images, 64, 4, None)[1].numpy())
    cfg = LandmarkTrainConfig(jsrt_root=str(tiny_jsrt), out_dir=str(tmp_path / "cv"), input_size=64, width=16,
                              epochs=2, batch_size=4, extent_points=True)
    summary = cross_validate_landmarks(cfg, folds=2)
    assert summary["extent_points"] and {n for n, *_ in CV_EXTENT_VARIANTS} <= set(summary["variants"])
    assert len(summary["extent_rule_mre_mm"]) == len(RULE_SHARES) ** 2
    assert "extent rule's shares" in (tmp_path / "cv" / "cv_metrics.txt").read_text()
    net, fold_cfg = load_landmark_checkpoint(tmp_path / "cv" / "fold1" / "best.pt")
    assert net.extent_points and fold_cfg.extent_points and fold_cfg.fold == 1
    with pytest.raises(ValueError, match="exactly one"):
        calibrate_confidence(tmp_path / "cv" / "fold0" / "best.pt", tmp_path / "cal", [], cv_dir=tmp_path / "cv")
    calib = calibrate_confidence(None, tmp_path / "cal", [], jsrt_root=str(tiny_jsrt), non_chest_files=[],
                                 cv_dir=tmp_path / "cv")
    frontal = [r["image"] for r in calib["rows"] if r["kind"] == "frontal"]
    assert sorted(frontal) == sorted(c.case_id for c in cases)  # every film once, by the fold that held it out
    assert calib["flip"] is False
    flipped = calibrate_confidence(None, tmp_path / "cal-flip", [], jsrt_root=str(tiny_jsrt), non_chest_files=[],
                                   cv_dir=tmp_path / "cv", flip=True)
    assert flipped["flip"] is True and len(flipped["rows"]) == len(calib["rows"])
    # the mirrored views move the points, so some geometry the gate reads changes with them
    assert [r["thorax_aspect"] for r in flipped["rows"]] != [r["thorax_aspect"] for r in calib["rows"]]
    assert len(calib["rows"]) == len(cases) * len([k for k in NEGATIVES if k != "non_chest"] + ["frontal"])
    (tmp_path / "cv" / "fold1" / "history.json").write_text("[]")  # a fold that stopped early is not calibrated on
    with pytest.raises(ValueError, match="stopped before"):
        calibrate_confidence(None, tmp_path / "cal", [], jsrt_root=str(tiny_jsrt), non_chest_files=[], cv_dir=tmp_path / "cv")


def test_a_checkpoint_from_before_amp_and_folds_loads_and_resumes_as_trained(tmp_path: Path) -> None:
    from dataclasses import asdict

    from training.common import check_resumable
    from training.landmarks import LandmarkTrainConfig, _saved_config, load_landmark_checkpoint, save_checkpoint
    from screener.pipeline.landmarks import LandmarkNet

    old = {k: v for k, v in asdict(LandmarkTrainConfig(width=8, amp=False)).items() if k not in ("amp", "folds", "fold")}
    save_checkpoint(tmp_path / "best.pt", {"model": LandmarkNet(width=8).state_dict(), "config": old})
    _, cfg = load_landmark_checkpoint(tmp_path / "best.pt")
    assert cfg.amp is False and cfg.folds == 0  # it ran in fp32 on the fixed split
    check_resumable(_saved_config({"config": old}), asdict(LandmarkTrainConfig(width=8, amp=False)))
    with pytest.raises(ValueError, match="amp"):
        check_resumable(_saved_config({"config": old}), asdict(LandmarkTrainConfig(width=8, amp=True)))


def test_folds_cover_every_image_exactly_once() -> None:
    from training.jsrt import fold_ids

    ids = [f"JPC{i:03d}" for i in range(197)]
    vals = [fold_ids(ids, 5, k)[1] for k in range(5)]
    assert sorted(sum(vals, [])) == ids and {len(v) for v in vals} == {39, 40}
    for k, val in enumerate(vals):
        train, _ = fold_ids(ids, 5, k)
        assert not set(train) & set(val) and len(train) + len(val) == 197
    with pytest.raises(ValueError, match="fold 5 of 5"):
        fold_ids(ids, 5, 5)


@pytest.mark.slow
def test_view_cv_trains_on_the_landmark_folds_and_calibrate_pairs_them(tiny_jsrt: Path, tmp_path: Path) -> None:
    from screener.pipeline.eligibility import EligibilityRules
    from screener.pipeline.view import VIEW_KINDS
    from training.landmarks import LandmarkTrainConfig, calibrate_confidence, cross_validate_landmarks
    from training.view import ViewTrainConfig, cross_validate_view, load_view_checkpoint, make_view_batch, _kind_weights

    root = tiny_jsrt
    rng = np.random.default_rng(0)
    films = [np.random.default_rng(i).random((200, 180), dtype=np.float32) for i in range(3)]
    x, y = make_view_batch(films, 64, rng, _kind_weights(0.3))
    assert x.shape == (6, 1, 64, 64) and (y[::2] == 0).all() and (y[1::2] > 0).all()  # each film and one negative
    with pytest.raises(ValueError, match="mirrored_share"):
        _kind_weights(1.0)
    view_cfg = ViewTrainConfig(jsrt_root=str(root), out_dir=str(tmp_path / "vcv"), input_size=64, width=4, epochs=2,
                               batch_size=8, source_size=128)
    report = cross_validate_view(view_cfg, folds=2)
    assert report["n"] == 10 and set(report["accepted"]["0.5"]) == set(VIEW_KINDS)
    assert "mirrored" in (tmp_path / "vcv" / "cv_view.txt").read_text()
    _, fold1 = load_view_checkpoint(tmp_path / "vcv" / "fold1" / "last.pt")
    assert (fold1.folds, fold1.fold) == (2, 1)
    lm_cfg = LandmarkTrainConfig(jsrt_root=str(root), out_dir=str(tmp_path / "lcv"), input_size=64, width=16, epochs=1, batch_size=4)
    cross_validate_landmarks(lm_cfg, folds=2)
    calib = calibrate_confidence(None, tmp_path / "cal", [], jsrt_root=str(root), non_chest_files=[],
                                 cv_dir=tmp_path / "lcv", view_cv_dir=tmp_path / "vcv")
    assert calib["view_threshold"] == EligibilityRules().min_view_frontal_probability
    assert all(r["view_frontal"] is not None for r in calib["rows"])
    with pytest.raises(ValueError, match="goes with"):
        calibrate_confidence(tmp_path / "lcv" / "fold0" / "last.pt", tmp_path / "cal", [], view_cv_dir=tmp_path / "vcv")
    with pytest.raises(ValueError, match="mirrored_share"):  # complete folds of other settings are not reused
        cross_validate_view(ViewTrainConfig(**{**view_cfg.__dict__, "mirrored_share": 0.5}), folds=2)
    cross_validate_view(ViewTrainConfig(**{**view_cfg.__dict__, "out_dir": str(tmp_path / "v3")}), folds=3)
    with pytest.raises(ValueError, match="landmark cv's folds"):
        calibrate_confidence(None, tmp_path / "cal", [], jsrt_root=str(root), non_chest_files=[],
                             cv_dir=tmp_path / "lcv", view_cv_dir=tmp_path / "v3")
