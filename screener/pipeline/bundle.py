"""The model bundle: weights plus a manifest that says what they are and how to use them.

A bundle is a directory::

    manifest.json          name, version, intended use, demo flag, landmark scheme, ROI recipe,
                           input normalisation, outputs, training data summary, metrics
    landmarks.pt           landmark detector weights (float16 state dict)
    bmd_0.pt [bmd_1.pt..]  BMD network weights; several files form an ensemble
    view.pt                the gate's view classifier (optional; bundles before it had none)
    tscore_reference.csv   the T-score reference table the bundle was validated with

Loading checks the manifest against what this code implements (format, landmark scheme and
order, ROI recipe, outputs, weight checksums) and refuses a mismatch with an error that names
the manifest key. Weights are stored as float16 to keep the demo bundle small in the wheel;
they are widened to float32 on load.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from screener.pipeline.landmarks import (
    EXTENT_POINTS,
    EXTENT_RULE,
    LANDMARK_NAMES,
    LANDMARK_SCHEME,
    SPINE_FROM_RULE,
    LandmarkDetector,
    LandmarkNet,
    check_extent_rule,
    check_spine_rule,
    check_views,
)
from screener.pipeline.model import Ensemble, MultiRoiConfig, MultiRoiNet
from screener.pipeline.view import VIEW_INPUT_SIZE, VIEW_KINDS, ViewClassifier, ViewNet, check_view_kinds
from screener.pipeline.rois import ROI_NAMES, ROI_RECIPE
from screener.pipeline.tscore import VERTEBRAE, ReferenceTable

__all__ = ["BUNDLE_FORMAT", "BundleError", "ModelBundle", "demo_bundle_path", "write_bundle", "sha256_file"]

BUNDLE_FORMAT = "cxr-bmd-bundle/1"
MANIFEST = "manifest.json"


class BundleError(ValueError):
    """The bundle is missing, damaged, or does not match this software."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def demo_bundle_path() -> Path:
    """The demo bundle shipped inside the package."""
    return Path(str(resources.files("screener.bundles") / "demo"))


def _half_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # contiguous(): the in-memory layout (channels-last) must not change the file's bytes, so
    # the same weights always give the same checksum.
    return {k: (v.half() if v.is_floating_point() else v).clone(memory_format=torch.contiguous_format) for k, v in state.items()}


def _float_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


def write_bundle(
    out_dir: Path | str,
    *,
    name: str,
    version: str,
    intended_use: str,
    demo: bool,
    landmark_net: LandmarkNet,
    landmark_input_size: int,
    landmark_width: int,
    bmd_nets: list[MultiRoiNet],
    table: ReferenceTable,
    training_data: dict[str, Any],
    validation: dict[str, Any],
    demo_statement: str = "",
    landmark_views: int = 1,
    landmark_flip: bool = False,
    spine_from_rule: dict[str, float] | None = None,
    extent_rule: dict[str, float] | None = None,
    view_net: ViewNet | None = None,
    view_input_size: int = VIEW_INPUT_SIZE,
) -> Path:
    """Write a complete bundle directory (overwriting files of the same name).

    ``landmark_views``, ``landmark_flip`` (each view also run mirrored), ``spine_from_rule``
    (default :data:`SPINE_FROM_RULE`) and, for a detector with extent points, ``extent_rule``
    (default :data:`EXTENT_RULE`) fix how the detector's output becomes the 16 points; they are
    part of the bundle's identity because they change every result. ``view_net`` is the gate's view classifier (optional).
    """
    try:
        check_views(landmark_views)
    except ValueError as exc:
        raise BundleError(f"write_bundle(landmark_views=...): {exc}") from exc
    has_extent = bool(getattr(landmark_net, "extent_points", False))
    if extent_rule is not None and not has_extent:
        raise BundleError("write_bundle(extent_rule=...): the landmark net has no extent points to apply it to")
    if demo and not demo_statement:
        raise BundleError("a demo bundle needs demo_statement: say what its labels are and why it is not for use")
    sizes = {n.config.roi_size for n in bmd_nets}
    if len(sizes) != 1:
        raise BundleError(f"ensemble members must share roi_size, got {sorted(sizes)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(_half_state(landmark_net.state_dict()), out / "landmarks.pt")
    models = []
    for i, net in enumerate(bmd_nets):
        fname = f"bmd_{i}.pt"
        torch.save(_half_state(net.state_dict()), out / fname)
        models.append({"config": net.config.to_dict(), "weights": fname, "sha256": sha256_file(out / fname)})
    view = None
    if view_net is not None:
        torch.save(_half_state(view_net.state_dict()), out / "view.pt")
        view = {"weights": "view.pt", "sha256": sha256_file(out / "view.pt"), "width": int(view_net.width),
                "input_size": int(view_input_size), "kinds": list(VIEW_KINDS)}
    (out / "tscore_reference.csv").write_text(table.to_csv())
    table_sha = sha256_file(out / "tscore_reference.csv")
    manifest = {
        "format": BUNDLE_FORMAT,
        "name": name,
        "version": version,
        "intended_use": intended_use,
        "demo": bool(demo),
        "demo_statement": demo_statement,
        "landmarks": {
            "scheme": LANDMARK_SCHEME,
            "names": list(LANDMARK_NAMES),
            "derived_not_annotated": ["cervical_spine", "t12"],
            "input_size": landmark_input_size,
            "width": landmark_width,
            "weights": "landmarks.pt",
            "sha256": sha256_file(out / "landmarks.pt"),
            "views": int(landmark_views),
            **({"flip": True} if landmark_flip else {}),  # absent = off: older bundles' identity is unchanged
            "spine_from_rule": check_spine_rule(SPINE_FROM_RULE if spine_from_rule is None else spine_from_rule),
            **({"extent_points": list(EXTENT_POINTS),
                "extent_rule": check_extent_rule(EXTENT_RULE if extent_rule is None else extent_rule)} if has_extent else {}),
        },
        **({"view": view} if view is not None else {}),
        "rois": {"recipe": ROI_RECIPE, "names": list(ROI_NAMES), "size": sizes.pop()},
        "input_normalisation": {
            "image": "display values in [0, 1] (VOI applied, MONOCHROME1 inverted); "
            "percentile stretch 0.1-99.9 -> [0, 1] before ROI cropping, 0.5-99.5 for the detector",
            "crop": "(x - 0.5) / 0.25, grey repeated to 3 channels",
        },
        "bmd": {"models": models, "combine": "mean of fused heads"},
        "outputs": {"sites": list(VERTEBRAE), "quantity": "areal BMD", "unit": "g/cm2"},
        "tscore_table": {"file": "tscore_reference.csv", "sha256": table_sha, "name": table.name, "sources": list(table.sources)},
        "training_data": training_data,
        "validation": validation,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


@dataclass(frozen=True)
class ModelBundle:
    """A loaded, checked bundle: the manifest plus ready networks."""

    path: Path
    manifest: dict[str, Any]
    landmark_net: LandmarkNet
    bmd: Ensemble
    table: ReferenceTable
    view_net: ViewNet | None = None

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def demo(self) -> bool:
        return bool(self.manifest["demo"])

    @property
    def model_id(self) -> str:
        """Stable id of everything that shapes a result or its report: name, version and a
        checksum over the weights' hashes, the T-score table's hash, the landmark, ROI and
        network settings and the demo flag and statement. Editing any of them gives a new id,
        so SR UIDs (derived from it) change and a PACS never takes a new result for a duplicate."""
        return model_id_of(self.manifest)

    @property
    def roi_size(self) -> int:
        return int(self.manifest["rois"]["size"])

    @property
    def landmark_input_size(self) -> int:
        return int(self.manifest["landmarks"]["input_size"])

    def detector(self, device: torch.device | str = "cpu", *, with_view: bool = True) -> LandmarkDetector:
        """The bundle's detector as the node runs it; ``with_view=False`` leaves out the view
        classifier (for what needs only the points, such as cropping training ROIs)."""
        # A bundle written before these keys existed ran the network alone on one view.
        lm = self.manifest["landmarks"]
        view = None if self.view_net is None or not with_view else ViewClassifier(self.view_net, int(self.manifest["view"]["input_size"]), device)
        return LandmarkDetector(self.landmark_net, self.landmark_input_size, device, views=int(lm.get("views", 1)),
                                flip=lm.get("flip", False),
                                spine_rule=dict(lm.get("spine_from_rule", {})), extent_rule=dict(lm.get("extent_rule", {})),
                                view=view)

    @classmethod
    def load(cls, path: Path | str | None = None) -> "ModelBundle":
        """Load and check a bundle directory (the shipped demo bundle when ``path`` is None)."""
        root, manifest = read_manifest(path)
        lm = manifest["landmarks"]
        landmark_net = LandmarkNet(width=int(lm["width"]), extent_points="extent_points" in lm)
        _load_state(landmark_net, root / lm["weights"], "landmarks.weights")
        members = []
        for i, spec in enumerate(manifest["bmd"]["models"]):
            try:
                config = MultiRoiConfig.from_dict(spec["config"])
            except (TypeError, ValueError, KeyError) as exc:
                raise BundleError(f"manifest bmd.models[{i}].config: {exc}") from exc
            net = MultiRoiNet(config)
            _load_state(net, root / spec["weights"], f"bmd.models[{i}].weights")
            members.append(net.eval())
        try:
            table = ReferenceTable.from_csv(root / manifest["tscore_table"]["file"], name=manifest["tscore_table"]["name"])
        except (OSError, ValueError) as exc:
            raise BundleError(f"manifest tscore_table.file: {exc}") from exc
        view_net = None
        if "view" in manifest:
            view_net = ViewNet(width=int(manifest["view"]["width"]))
            _load_state(view_net, root / manifest["view"]["weights"], "view.weights")
            view_net.eval()
        return cls(path=root, manifest=manifest, landmark_net=landmark_net.eval(), bmd=Ensemble(members).eval(), table=table,
                   view_net=view_net)


def read_manifest(path: Path | str | None = None) -> tuple[Path, dict]:
    """A bundle's folder and its checked manifest (files and hashes), without loading a network:
    for what needs only the bundle's identity (`screener backfill`: its model id)."""
    root = Path(path) if path is not None else demo_bundle_path()
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{root} is not a model bundle: {MANIFEST} not found")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{mpath}: not valid JSON ({exc})") from exc
    try:
        _check_manifest(manifest, root)
    except (KeyError, TypeError, AttributeError) as exc:  # a malformed manifest, not a crash
        raise BundleError(f"{mpath}: malformed manifest ({type(exc).__name__}: {exc})") from exc
    return root, manifest


#: Manifest keys that change results or report text (the rest documents the bundle).
IDENTITY_KEYS = ("name", "version", "demo", "demo_statement", "landmarks", "view", "rois", "input_normalisation", "bmd", "outputs", "tscore_table")


OPTIONAL_IDENTITY_KEYS = ("view",)


def model_id_of(manifest: dict) -> str:
    # An optional key enters only when present, so adding one to the software keeps the ids
    # of the bundles written before it.
    keys = [k for k in IDENTITY_KEYS if k not in OPTIONAL_IDENTITY_KEYS or k in manifest]
    identity = {k: manifest.get(k) for k in keys}
    landmarks = identity.get("landmarks")
    if isinstance(landmarks, dict) and landmarks.get("flip") is False:  # written out, the default is still the default
        identity["landmarks"] = {k: v for k, v in landmarks.items() if k != "flip"}
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return f"{manifest['name']}@{manifest['version']}+{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"


def _require(manifest: dict, key: str) -> Any:
    node: Any = manifest
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise BundleError(f"manifest key {key!r} is missing")
        node = node[part]
    return node


def _check_manifest(manifest: dict, root: Path) -> None:
    if _require(manifest, "format") != BUNDLE_FORMAT:
        raise BundleError(f"manifest format is {manifest['format']!r}; this software reads {BUNDLE_FORMAT!r}")
    for key in ("name", "version", "intended_use", "demo", "rois.size", "tscore_table.file", "tscore_table.name"):
        _require(manifest, key)
    if _require(manifest, "landmarks.scheme") != LANDMARK_SCHEME:
        raise BundleError(f"manifest landmarks.scheme is {manifest['landmarks']['scheme']!r}; this software implements {LANDMARK_SCHEME!r}")
    if list(_require(manifest, "landmarks.names")) != list(LANDMARK_NAMES):
        raise BundleError("manifest landmarks.names differ from this software's landmark order")
    if _require(manifest, "rois.recipe") != ROI_RECIPE:
        raise BundleError(f"manifest rois.recipe is {manifest['rois']['recipe']!r}; this software implements {ROI_RECIPE!r}")
    if list(_require(manifest, "outputs.sites")) != list(VERTEBRAE) or _require(manifest, "outputs.unit") != "g/cm2":
        raise BundleError(f"manifest outputs must be sites {list(VERTEBRAE)} in g/cm2")
    if manifest["demo"] and not manifest.get("demo_statement"):
        raise BundleError("manifest demo is true but demo_statement is empty")
    models = _require(manifest, "bmd.models")
    if not isinstance(models, list) or not models:
        raise BundleError("manifest bmd.models must list at least one model")
    for key in ("landmarks.width", "landmarks.input_size", "tscore_table.sha256"):
        _require(manifest, key)
    try:
        check_views(manifest["landmarks"].get("views", 1))
    except ValueError as exc:
        raise BundleError(f"manifest landmarks.views: {exc}") from exc
    if not isinstance(manifest["landmarks"].get("flip", False), bool):
        raise BundleError(f"manifest landmarks.flip must be true or false, got {manifest['landmarks']['flip']!r}")
    try:
        check_spine_rule(manifest["landmarks"].get("spine_from_rule", {}))
    except ValueError as exc:
        raise BundleError(f"manifest landmarks.spine_from_rule: {exc}") from exc
    lm = manifest["landmarks"]
    if "extent_points" in lm and list(lm["extent_points"]) != list(EXTENT_POINTS):
        raise BundleError(f"manifest landmarks.extent_points must be {list(EXTENT_POINTS)} (in that order) or absent")
    if "extent_rule" in lm and "extent_points" not in lm:
        raise BundleError("manifest landmarks.extent_rule is set but landmarks.extent_points is not: the detector has no extent points")
    if "extent_points" in lm and "extent_rule" not in lm:
        raise BundleError("manifest landmarks.extent_points is set but landmarks.extent_rule is not: say how they enter the 16 points")
    try:
        check_extent_rule(lm.get("extent_rule", {}))
    except ValueError as exc:
        raise BundleError(f"manifest landmarks.extent_rule: {exc}") from exc
    table = root / str(manifest["tscore_table"]["file"])
    if not _inside(root, table) or not table.is_file() or sha256_file(table) != manifest["tscore_table"]["sha256"]:
        raise BundleError(f"manifest tscore_table.sha256 does not match {table.name} (or the file is missing): the table was changed")
    if "view" in manifest:
        for key in ("view.weights", "view.sha256", "view.width", "view.input_size", "view.kinds"):
            _require(manifest, key)
        try:
            check_view_kinds(manifest["view"]["kinds"])
        except ValueError as exc:
            raise BundleError(f"manifest view.kinds: {exc}") from exc
        for key, least in (("width", 1), ("input_size", 32)):  # below 32 px the five stages leave nothing
            value = manifest["view"][key]
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise BundleError(f"manifest view.{key} must be a whole number >= {least}, got {value!r}")
    checks = [("landmarks", manifest["landmarks"])] + [(f"bmd.models[{i}]", m) for i, m in enumerate(models)]
    checks += [("view", manifest["view"])] if "view" in manifest else []
    for key, spec in checks:
        if not isinstance(spec, dict) or "config" not in spec and key not in ("landmarks", "view"):
            raise BundleError(f"manifest {key} must be an object with weights, sha256 and config")
        weights = root / str(spec.get("weights", ""))
        if not _inside(root, weights):
            raise BundleError(f"manifest {key}.weights points outside the bundle: {spec.get('weights')!r}")
        if not weights.is_file():
            raise BundleError(f"manifest {key}.weights: file {weights} not found")
        if sha256_file(weights) != spec.get("sha256"):
            raise BundleError(f"manifest {key}.sha256 does not match {weights.name}: the file is damaged or was replaced")
        if key.startswith("bmd") and int(spec["config"].get("roi_size", -1)) != int(manifest["rois"]["size"]):
            raise BundleError(f"manifest {key}.config.roi_size differs from rois.size")


def _inside(root: Path, path: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def _load_state(net: torch.nn.Module, path: Path, key: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(_float_state(state), strict=True)
    except (RuntimeError, KeyError, OSError) as exc:
        raise BundleError(f"manifest {key}: {path.name} does not fit the declared architecture ({exc})") from exc
