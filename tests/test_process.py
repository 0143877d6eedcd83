"""`screener process` end to end with the shipped demo bundle on real CR files (pydicom-data)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from screener.cli import main
from tests.support.common import SHARED, rg1_file
from tests.support.films import renumbered_copies
from tests.support.validators import dciodvfy, dsrdump, pixelmed_sr

SYNTAXES = ("RG1_UNCR.dcm", "RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int, dict[str, dict]]:
    """Four transfer syntaxes of one radiograph plus three bad inputs, processed in one run."""
    src = tmp_path_factory.mktemp("in")
    for i, name in enumerate(SYNTAXES):
        ds = pydicom.dcmread(rg1_file(name))
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.1234.{i + 1}"  # the fixtures share one UID
        ds.save_as(src / name)
    (src / "notes.txt").write_text("not a radiograph")
    corrupt = pydicom.dcmread(rg1_file("RG1_J2KR.dcm"))
    corrupt.SOPInstanceUID = "1.2.826.0.1.3680043.10.1234.99"
    corrupt.PixelData = corrupt.PixelData[: len(corrupt.PixelData) // 3]
    corrupt.save_as(src / "corrupt.dcm")
    out = tmp_path_factory.mktemp("out")
    rc = main(["process", str(src), "--out", str(out), "--device", "cpu", "--batch-size", "3", "--quiet"])
    results = {json.loads(p.read_text())["file"].split("/")[-1]: json.loads(p.read_text()) for p in out.glob("*.json")}
    return src, out, rc, results


def _texts(ds) -> set[str]:
    """Every TEXT value anywhere in an SR content tree."""
    found = set()
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == "TEXT":
            found.add(str(item.TextValue))
        found |= _texts(item)
    return found


def test_every_input_has_exactly_one_result(processed) -> None:
    src, _, rc, results = processed
    assert rc == 0
    assert set(results) == {p.name for p in src.iterdir()}


def test_radiographs_are_reported_with_sr_and_gsps(processed) -> None:
    _, out, _, results = processed
    for name in SYNTAXES:
        r = results[name]
        assert r["status"] == "reported", r
        assert r["result"]["demo"] is True and "NOT FOR CLINICAL USE" in r["result"]["demo_statement"]
        assert 0.3 < r["result"]["bmd_g_cm2"]["L1-L4"] < 1.6
        assert r["result"]["tscore"] is not None  # PatientSex F is in the files
        assert r["result"]["precision"] == "fp32"  # auto on the CPU; recorded as it ran
        sr = pydicom.dcmread(r["outputs"]["sr"]["path"])
        assert "precision=fp32" in _texts(sr)  # in the SR's Algorithm Parameters too
        assert list(r["outputs"]) == ["sr", "gsps", "image", "pdf"]
        for output in r["outputs"].values():
            path = Path(output["path"])
            # each object is named after its own SOP Instance UID, so model versions never collide
            assert path.is_file() and path.parent == out and path.name.startswith(output["sop_instance_uid"] + ".")
            assert pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID == output["sop_instance_uid"]


def test_transfer_syntaxes_agree(processed) -> None:
    _, _, _, results = processed
    bmd = {n: np.array([results[n]["result"]["bmd_g_cm2"][s] for s in ("L1", "L2", "L3", "L4")]) for n in SYNTAXES}
    np.testing.assert_allclose(bmd["RG1_J2KR.dcm"], bmd["RG1_UNCR.dcm"], atol=1e-6)  # lossless: identical
    for name in ("RG1_UNCI.dcm", "RG1_J2KI.dcm"):
        np.testing.assert_allclose(bmd[name], bmd["RG1_UNCR.dcm"], atol=0.02)


def test_bad_inputs_get_reasons_not_crashes(processed) -> None:
    _, _, _, results = processed
    assert results["notes.txt"]["status"] == "error" and results["notes.txt"]["code"] == "not-dicom"
    assert results["corrupt.dcm"]["code"] == "corrupt-pixel-data"


@pytest.mark.dicom3tools
@pytest.mark.dcmtk
@pytest.mark.java
def test_outputs_pass_the_validators(processed) -> None:
    _, _, _, results = processed
    outputs = [Path(o["path"]) for o in results["RG1_UNCR.dcm"]["outputs"].values()]
    assert [p.name.split(".", -1)[-2] for p in outputs] == ["sr", "gsps", "sc", "pdf"]
    sr_path, *others = outputs
    for check in (dciodvfy, dsrdump, pixelmed_sr):
        errors, _ = check(sr_path)
        assert errors == [], (check.__name__, errors)
    for path in others:  # GSPS, result image, PDF
        assert dciodvfy(path)[0] == [], path.name


@pytest.mark.parametrize("kind", ["sr", "gsps", "image", "pdf"], ids=["sr", "gsps", "result-image", "pdf"])
def test_our_own_outputs_are_not_processed(processed, tmp_path: Path, kind: str) -> None:
    _, _, _, results = processed
    output = Path(results["RG1_UNCR.dcm"]["outputs"][kind]["path"])
    shutil.copy(output, tmp_path / "loop.dcm")
    # even where secondary captures are screened, our own result image is not
    config = tmp_path / "screener.toml"
    config.write_text("[eligibility]\naccept_secondary_capture = true\n")
    assert main(["process", str(tmp_path / "loop.dcm"), "--out", str(tmp_path / "o"), "--quiet",
                 "--config", str(config)]) == 0
    r = json.loads(next((tmp_path / "o").glob("*.json")).read_text())
    assert r["status"] == "ineligible" and r["code"] == "own-output", r


def test_usage_errors_exit_non_zero(tmp_path: Path) -> None:
    assert main(["process", str(tmp_path / "missing.dcm"), "--out", str(tmp_path / "o")]) == 2
    assert main(["process", str(tmp_path), "--out", str(tmp_path / "o"), "--bundle", str(tmp_path)]) == 2


@pytest.mark.skipif(not (SHARED / "dicom").is_dir(), reason="extended check: ../shared/data/dicom not present")
@pytest.mark.dicom3tools
def test_shared_vendor_files_each_get_a_validated_sr_or_a_reason(tmp_path: Path) -> None:
    assert main(["process", str(SHARED / "dicom"), "--out", str(tmp_path), "--quiet"]) == 0
    results = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert len(results) == len(list((SHARED / "dicom").glob("*.dcm")))
    by_name = {Path(r["file"]).name: r for r in results}
    assert by_name["canon_dx_chest_j2k_corrupt.dcm"]["code"] == "corrupt-pixel-data"
    for r in results:
        assert r["reason"], r
        if r["status"] == "reported":
            assert dciodvfy(Path(r["outputs"]["sr"]["path"]))[0] == []


def test_gsps_preview_draws_outlines_where_the_rois_are(processed, tmp_path: Path) -> None:
    """Read the GSPS back, draw it, and find the outline colour on each ROI edge."""
    from PIL import Image

    from screener.pipeline.decode import decode_file
    from screener.report.preview import OUTLINE, render_gsps

    _, _, _, results = processed
    r = results["RG1_UNCR.dcm"]
    gsps = pydicom.dcmread(r["outputs"]["gsps"]["path"])
    pixels = decode_file(rg1_file()).pixels
    png = render_gsps(pixels, gsps, tmp_path / "gsps.png", max_side=4096)  # full size: no rescaling
    drawn = np.asarray(Image.open(png).convert("RGB")).astype(int)
    h, w = pixels.shape
    for name, corners in r["result"]["roi_corners_xy"].items():
        if name == "whole_image":
            continue
        a, b = np.array(corners[0]), np.array(corners[1])  # top edge of the ROI
        x, y = np.round((a + b) / 2).astype(int)
        if 0 <= x < w and 0 <= y < h:
            patch = drawn[max(0, y - 2) : y + 3, max(0, x - 2) : x + 3].reshape(-1, 3)
            assert (np.abs(patch - OUTLINE).sum(axis=1) < 30).any(), name


def test_one_failing_output_does_not_stop_the_others(tmp_path: Path) -> None:
    """An unwritable output for one image: that image errors, the next is still processed."""
    src = tmp_path / "in"
    src.mkdir()
    for i, name in enumerate(("RG1_UNCR.dcm", "RG1_J2KR.dcm")):
        ds = pydicom.dcmread(rg1_file(name))
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.1234.{50 + i}"
        ds.save_as(src / name)
    out = tmp_path / "out"
    out.mkdir()
    from screener.pipeline.bundle import ModelBundle
    from screener.report.sr import report_uids

    sr_uid = report_uids("1.2.826.0.1.3680043.10.1234.50", ModelBundle.load(None).model_id).sr_instance_uid
    (out / f"{sr_uid}.sr.dcm").mkdir()  # a folder where the SR should go
    assert main(["process", str(src), "--out", str(out), "--quiet", "--batch-size", "2"]) == 0
    first = json.loads((out / "1.2.826.0.1.3680043.10.1234.50.json").read_text())
    second = json.loads((out / "1.2.826.0.1.3680043.10.1234.51.json").read_text())
    assert first["status"] == "error" and first["code"] == "output-failed"
    assert second["status"] == "reported"
    assert not list(out.glob(".*.part"))  # no half-written files left behind


def test_inputs_skip_hidden_and_output_folders_and_duplicates(tmp_path: Path) -> None:
    from screener.process import find_inputs

    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "a.dcm").write_bytes(b"x")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.json").write_text("{}")
    (tmp_path / "b.dcm").write_bytes(b"x")
    found = find_inputs([tmp_path, tmp_path / "b.dcm"], exclude=tmp_path / "out")
    assert [f.name for f in found] == ["b.dcm"]


def test_same_file_names_in_two_folders_do_not_collide(tmp_path: Path) -> None:
    from screener.process import output_stem

    assert output_stem("", tmp_path / "a" / "IM0001") != output_stem("", tmp_path / "b" / "IM0001")
    assert output_stem("1.2.3", tmp_path / "x") == "1.2.3"
    assert output_stem("../../etc", tmp_path / "x").startswith("x-")


def test_a_picture_that_cannot_be_made_leaves_the_result_and_is_not_queued(tmp_path: Path, monkeypatch) -> None:
    """The SR and GSPS are the result; a result image or PDF that fails is left out and said,
    and only the kinds some destination takes are built at all."""
    import screener.report.pdf as pdf
    from screener.pipeline.bundle import ModelBundle
    from screener.process import Processor

    def broken(*args, **kwargs):
        raise ValueError("no PDF today")

    monkeypatch.setattr(pdf, "build_pdf", broken)
    processor = Processor(ModelBundle.load(), tmp_path / "out", kinds=("sr", "pdf"))
    assert processor.kinds == ("sr", "gsps", "pdf")  # the SR and GSPS always
    [outcome] = processor.run([rg1_file()])
    assert outcome.status == "reported", outcome.reason
    assert list(outcome.outputs) == ["sr", "gsps"]  # no picture, no PDF
    assert "pdf not built (ValueError: no PDF today)" in outcome.reason
    with pytest.raises(ValueError, match="kinds: unknown"):
        Processor(ModelBundle.load(), tmp_path / "o", kinds=("sr", "video"))


def test_the_next_batch_is_decoded_while_this_one_is_estimated(tmp_path: Path) -> None:
    """Outcomes follow the input order, one per file, and the read of batch k+1 starts before
    batch k has left the networks and the report (the stages overlap)."""
    import time

    from screener.pipeline.bundle import ModelBundle
    from screener.process import Processor

    files = renumbered_copies([rg1_file()], tmp_path, 3, "1.2.826.0.1.3680043.10.1234.5")
    (tmp_path / "junk.dcm").write_text("not DICOM")
    files.insert(1, tmp_path / "junk.dcm")
    processor = Processor(ModelBundle.load(), tmp_path / "out", batch_size=1, decode_workers=1)
    events: list[tuple[str, str, float]] = []
    read, finish = processor._read, processor._finish_batch

    def timed_read(path):
        events.append(("read", path.name, time.perf_counter()))
        return read(path)

    def timed_finish(items):
        yield from finish(items)
        events.append(("finished", items[0].path.name, time.perf_counter()))

    processor._read, processor._finish_batch = timed_read, timed_finish  # type: ignore[method-assign]
    outcomes = list(processor.run(files))
    assert [o.file for o in outcomes] == files
    assert [o.status.value for o in outcomes] == ["reported", "error", "reported", "reported"]
    order = [(kind, name) for kind, name, _ in sorted(events, key=lambda e: e[2])]
    for before, after in zip(files, files[1:]):
        assert order.index(("read", after.name)) < order.index(("finished", before.name))


def test_closing_the_outcomes_early_drops_the_reads_not_started(tmp_path: Path, monkeypatch) -> None:
    """A caller that stops (Ctrl-C in `screener process`) does not wait for the next batch to be
    decoded for nobody: reads that had not started are cancelled."""
    import threading

    from screener import process
    from screener.pipeline.bundle import ModelBundle
    from screener.process import Processor

    files = renumbered_copies([rg1_file()], tmp_path, 8, "1.2.826.0.1.3680043.10.1234.6")
    processor = Processor(ModelBundle.load(), tmp_path / "out", batch_size=4, decode_workers=1)
    read = processor._read
    started: list[str] = []

    release = threading.Event()

    def held_read(path):  # batch 2's first read holds the one decode thread until released
        started.append(path.name)
        if len(started) == 5:
            assert release.wait(120), "never released"
        return read(path)

    class ReleasingPool(process.ThreadPoolExecutor):
        def shutdown(self, *args, **kwargs):  # run() has cancelled the queued reads by now
            release.set()
            super().shutdown(*args, **kwargs)

    monkeypatch.setattr(process, "ThreadPoolExecutor", ReleasingPool)
    processor._read = held_read  # type: ignore[method-assign]
    outcomes = processor.run(files)
    first = next(outcomes)  # batch 1 done; batch 2: one read running (held), three queued
    outcomes.close()
    assert first.status.value == "reported"
    assert started == [f.name for f in files[:5]]  # the three queued reads never ran
    assert len(list((tmp_path / "out").glob("*.sr.dcm"))) == 4  # batch 1's, and no other
