"""Landmarks -> ROIs -> multi-ROI network -> T-scores, batched, for one bundle.

Pure computation on display-value images: no DICOM, no database, no network. The node and
``screener process`` both call :class:`BmdEstimator`; eligibility checks sit between
:meth:`BmdEstimator.detect` and :meth:`BmdEstimator.estimate`.
"""

from __future__ import annotations

import contextlib
import enum
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from screener.pipeline.bundle import ModelBundle
from screener.pipeline.geometry import Pyramid
from screener.pipeline.landmarks import Landmarks, normalise_crop
from screener.pipeline.rois import RoiSet, extract_rois
from screener.pipeline.tscore import TScoreResult, compute_tscores

__all__ = ["AlgorithmInfo", "BmdEstimate", "BmdEstimator", "Inference", "Precision", "resolve_device",
           "BF16_TOLERANCE_G_CM2", "cpu_has_fast_bf16"]


@dataclass(frozen=True)
class AlgorithmInfo:
    """What produced a result, as reports must state it (from the bundle manifest)."""

    name: str
    version: str
    model_id: str  # name@version+weights checksum: stable id of these exact weights
    demo: bool
    demo_statement: str  # empty unless demo
    #: The BMD network's number format as it ran (a resolved Precision: never auto). bf16 and
    #: fp16 stay within BF16_TOLERANCE_G_CM2 of fp32, but a result should say which it is.
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16", "fp16"):  # a resolved Precision, never auto
            raise ValueError(f"AlgorithmInfo.precision = {self.precision!r}: the precision as it ran, fp32, bf16 or fp16")

    @classmethod
    def from_bundle(cls, bundle: ModelBundle, precision: "Precision | str") -> "AlgorithmInfo":
        return cls(bundle.name, bundle.version, bundle.model_id, bundle.demo, bundle.manifest.get("demo_statement", ""),
                   str(precision))


@dataclass(frozen=True)
class BmdEstimate:
    landmarks: Landmarks
    rois: RoiSet
    bmd: tuple[float, float, float, float]  # L1..L4, g/cm2
    tscores: TScoreResult
    algorithm: AlgorithmInfo

    @property
    def model_id(self) -> str:
        return self.algorithm.model_id

    @property
    def demo(self) -> bool:
        return self.algorithm.demo


def resolve_device(device: str) -> torch.device:
    """'cpu', 'cuda' or 'auto' (CUDA when available). Fails clearly if CUDA is asked for but absent."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available (use 'cpu' or 'auto')")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be cpu, cuda or auto, got {device!r}")
    return torch.device(device)


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: no flags known, so no claim of native bf16
        return frozenset()


def cpu_has_fast_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU computes bf16 natively: AMX (Intel Sapphire Rapids and later) or
    AVX512-BF16 (Cooper Lake, AMD Zen 4), from Linux's /proc/cpuinfo. Elsewhere bf16 is
    emulated and can be slower than fp32."""
    flags = _cpu_flags() if flags is None else flags
    return "amx_bf16" in flags or "avx512_bf16" in flags


class Precision(enum.StrEnum):
    """Number format of the BMD network's forward pass.

    fp32 is the reference. bf16 and fp16 run the network under torch.autocast, which keeps
    the ops that lose too much in half precision (sums, norms, softmax) in fp32; on a GPU
    with tensor cores that is several times the fp32 rate, and on a CPU with native bf16
    too (:func:`cpu_has_fast_bf16`; the paper's VGG16 3.8x on the development machine's AMX:
    bench/pipeline_timing.py --precisions). auto: bf16 on a CUDA GPU that has it, fp16 on an
    older one, fp32 on the CPU. Every result records the precision it ran at
    (:attr:`AlgorithmInfo.precision`: the SR's Algorithm Parameters, ``result.precision`` in
    the stored document). Not bf16 on the CPU by itself: which processor a node runs on would
    then change its numbers (by far less than the tolerance), and the bundled model gains
    nothing from it; a site that wants the speed for a large model names bf16, and the node
    says so at start where the CPU has it. The landmark detector always runs in fp32: its soft-argmax turns
    small heat-map errors into millimetres, and it is a small share of the work.
    """

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    AUTO = "auto"

    def resolve(self, device: torch.device) -> "Precision":
        if self is not Precision.AUTO:
            return self
        if device.type != "cuda":
            return Precision.FP32
        # bf16 in hardware from compute capability 8 (Ampere); torch's is_bf16_supported() also
        # says yes where it is only emulated, and asks about the current device, not this one.
        return Precision.BF16 if torch.cuda.get_device_capability(device)[0] >= 8 else Precision.FP16


#: How far a bf16/fp16 BMD may be from the fp32 one, in g/cm2 (tests hold the bundled model to
#: it): a tenth of the ~0.1 g/cm2 that separates one T-score unit, under the model's own error.
BF16_TOLERANCE_G_CM2 = 0.01


@dataclass(frozen=True)
class Inference:
    """How the networks run: precision, memory layout and compilation (config [model])."""

    precision: Precision = Precision.AUTO
    channels_last: bool = True  # NHWC weights: what cuDNN's tensor-core kernels and oneDNN want
    compile: bool = False  # torch.compile the BMD network: compiled on its first batch (a minute or more)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        precision = self.precision.resolve(device)
        if precision is Precision.FP32:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision is Precision.BF16 else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)


class BmdEstimator:
    def __init__(self, bundle: ModelBundle, device: str | torch.device = "cpu",
                 inference: Inference = Inference()) -> None:
        self.bundle = bundle
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.inference = inference
        self.detector = bundle.detector(self.device)
        net = bundle.bmd.to(self.device).eval()
        if inference.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.bmd_net = torch.compile(net) if inference.compile else net
        self.algorithm = AlgorithmInfo.from_bundle(bundle, inference.precision.resolve(self.device))

    def detect(self, images: Sequence[np.ndarray | Pyramid]) -> list[Landmarks]:
        return self.detector.detect(images)

    @torch.inference_mode()
    def estimate(
        self,
        images: Sequence[np.ndarray | Pyramid],
        sexes: Sequence[str | None],
        landmarks: Sequence[Landmarks] | None = None,
    ) -> list[BmdEstimate]:
        """BMD, T-scores and WHO category for each image (display values in [0, 1])."""
        if len(sexes) != len(images):
            raise ValueError("one sex value (or None) per image is required")
        pyramids = [im if isinstance(im, Pyramid) else Pyramid(im) for im in images]
        if landmarks is None:
            landmarks = self.detect(pyramids)
        roi_sets = [extract_rois(p, lm, self.bundle.roi_size) for p, lm in zip(pyramids, landmarks)]
        if not roi_sets:
            return []
        x = torch.from_numpy(normalise_crop(np.stack([r.crops for r in roi_sets]))).to(self.device)
        with self.inference.autocast(self.device):
            out = self.bmd_net(x, roi_sets[0].names)
        bmd = out.double().cpu().numpy()
        return [
            BmdEstimate(
                landmarks=lm,
                rois=rs,
                bmd=tuple(float(v) for v in b),  # type: ignore[arg-type]
                tscores=compute_tscores(b, sex, self.bundle.table),
                algorithm=self.algorithm,
            )
            for lm, rs, b, sex in zip(landmarks, roi_sets, bmd, sexes)
        ]
