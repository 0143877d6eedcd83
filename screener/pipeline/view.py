"""Is this a frontal chest film the right way round? A small view classifier for the gate.

The landmark gate (:mod:`screener.pipeline.eligibility`) checks the geometry of the 16
points and a few grey values along them. Two kinds of wrong film get past such checks: a
film flipped left to right (a viewer cannot tell, but the left and right ROIs swap) whose
heart shadow does not read clearly, and a film cut to its upper half, where the detector
still finds plausible points. A classifier that looks at the whole film refuses them: it
sees the heart's shape, the aortic knob, the gastric bubble and where the diaphragm is.

The network is a plain five-stage CNN on the letterboxed film at 128 pixels whose head
keeps the 4 x 4 layout (a global pool would forget which side the heart is on). It is
trained (``screener-train view``) on JSRT films and the gate's generated negatives of the
kinds in :data:`VIEW_KINDS`; its probability of "frontal" is what the gate thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from screener.pipeline.geometry import Pyramid
from screener.pipeline.landmarks import landmark_input, normalise_crop

__all__ = ["VIEW_KINDS", "VIEW_INPUT_SIZE", "ViewScores", "ViewNet", "ViewClassifier", "check_view_kinds"]

#: The classes, "frontal" first. The other names are the gate calibration's negative kinds
#: (training.landmarks.NEGATIVES); blank, noise and non-chest films are left to the landmark
#: confidence, so that the calibration's non-chest row stays a test on films never trained on.
VIEW_KINDS: tuple[str, ...] = (
    "frontal",
    "mirrored",
    "upper_half",
    "lower_half",
    "upside_down",
    "rotated_90",
    "rotated_180",
    "rotated_270",
    "lateral_like",
    "inverted",
)

#: Side of the classifier's square input in pixels (the whole film, letterboxed).
VIEW_INPUT_SIZE = 128


def check_view_kinds(kinds: Sequence[object]) -> tuple[str, ...]:
    """The kinds a stored classifier was trained on must be this software's, in its order."""
    out = tuple(str(k) for k in kinds)
    if out != VIEW_KINDS:
        raise ValueError(f"must be {list(VIEW_KINDS)} (in that order), got {list(out)}")
    return out


@dataclass(frozen=True)
class ViewScores:
    """The classifier's probability of each of :data:`VIEW_KINDS` for one film."""

    probabilities: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.probabilities) != len(VIEW_KINDS):
            raise ValueError(f"ViewScores needs {len(VIEW_KINDS)} probabilities, got {len(self.probabilities)}")

    @property
    def frontal(self) -> float:
        """Probability that the film is a frontal chest film the right way round."""
        return self.probabilities[0]

    @property
    def likeliest_other(self) -> tuple[str, float]:
        """The most probable kind other than frontal, and its probability (for the refusal's reason)."""
        k = int(np.argmax(self.probabilities[1:])) + 1
        return VIEW_KINDS[k], self.probabilities[k]


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class ViewNet(nn.Module):
    """Five conv stages (128 -> 4 pixels), then a linear head over the 4 x 4 layout."""

    def __init__(self, width: int = 16, num_kinds: int = len(VIEW_KINDS)) -> None:
        super().__init__()
        chans = [1, width, 2 * width, 4 * width, 8 * width, 8 * width]
        self.width = width
        self.features = nn.Sequential(*[_stage(a, b) for a, b in zip(chans, chans[1:])])
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(chans[-1] * 16, num_kinds))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        if f.shape[-2:] != (4, 4):  # any input size works; the head wants the 4 x 4 layout
            f = nn.functional.adaptive_avg_pool2d(f, 4)
        return self.head(f)


def view_input(image: np.ndarray | Pyramid, size: int = VIEW_INPUT_SIZE) -> np.ndarray:
    """The classifier's input: the whole film letterboxed to ``size``, stretched as the detector's."""
    return normalise_crop(landmark_input(image, size)[0])


class ViewClassifier:
    """Runs a trained :class:`ViewNet` on whole images, batched, on CPU or GPU."""

    def __init__(self, net: ViewNet, input_size: int = VIEW_INPUT_SIZE, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.input_size = int(input_size)

    @torch.inference_mode()
    def classify(self, images: Sequence[np.ndarray | Pyramid]) -> list[ViewScores]:
        if not images:
            return []
        x = torch.from_numpy(np.stack([view_input(im, self.input_size) for im in images]))[:, None].to(self.device)
        p = torch.softmax(self.net(x).float(), dim=1).cpu().double().numpy()
        return [ViewScores(tuple(float(v) for v in row)) for row in p]
