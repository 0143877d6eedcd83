"""The multi-ROI BMD network (METHOD.md section 3).

A shared torchvision backbone encodes every ROI crop; global average pooling gives one vector
per ROI. A shared FC layer maps each vector to L1..L4 (auxiliary heads, one per ROI) and a
separate head maps all ROI vectors together to L1..L4 (the prediction used at test time):

- ``head="concat"``: the paper's concatenation of the R vectors -> FC;
- ``head="attention"``: the follow-up's anatomy-aware variant: each ROI vector is projected to
  a token, a learned per-ROI (anatomy) embedding is added, a transformer encoder mixes the
  tokens, and the tokens are concatenated -> FC. The auxiliary heads read the same encoded
  tokens, so every head is trained through the encoder.

Loss: the mean of the MSEs of all R + 1 heads (8 for the full model).
Single-ROI models are the same class with one ROI name; ensembles average several models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torchvision
from torch import nn

from screener.pipeline.rois import ROI_NAMES

__all__ = ["BACKBONES", "MultiRoiConfig", "MultiRoiOutput", "MultiRoiNet", "multi_roi_loss", "Ensemble"]

BACKBONES: tuple[str, ...] = ("vgg11", "vgg16", "vgg11_bn", "vgg16_bn", "resnet18", "resnet34", "resnet50")
HEADS: tuple[str, ...] = ("concat", "attention")
NUM_OUTPUTS = 4  # L1, L2, L3, L4


@dataclass(frozen=True)
class MultiRoiConfig:
    backbone: str = "vgg16"
    rois: tuple[str, ...] = ROI_NAMES
    head: str = "concat"
    roi_size: int = 256
    attention_dim: int = 256
    attention_layers: int = 2
    attention_heads: int = 4

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone {self.backbone!r} unknown; choose one of {BACKBONES}")
        if self.head not in HEADS:
            raise ValueError(f"head {self.head!r} unknown; choose one of {HEADS}")
        if not self.rois or len(set(self.rois)) != len(self.rois):
            raise ValueError(f"rois must be a non-empty list of distinct names, got {self.rois}")
        bad = [r for r in self.rois if r not in ROI_NAMES]
        if bad:
            raise ValueError(f"rois {bad} unknown; choose from {ROI_NAMES}")
        if self.roi_size < 32:
            raise ValueError(f"roi_size must be at least 32 pixels, got {self.roi_size}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rois"] = list(self.rois)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MultiRoiConfig":
        return cls(**{**d, "rois": tuple(d["rois"])})


@dataclass(frozen=True)
class MultiRoiOutput:
    final: torch.Tensor  # (B, 4): the prediction used at test time
    per_roi: torch.Tensor  # (B, R, 4): auxiliary predictions


def make_backbone(name: str) -> tuple[nn.Module, int]:
    """Convolutional trunk of a torchvision architecture (no pretrained download) and its width."""
    ctor = getattr(torchvision.models, name)
    net = ctor(weights=None)
    if name.startswith("vgg"):
        return net.features, 512
    trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
    return trunk, net.fc.in_features


class MultiRoiNet(nn.Module):
    def __init__(self, config: MultiRoiConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone, dim = make_backbone(config.backbone)
        self.backbone.to(memory_format=torch.channels_last)
        self.pool = nn.AdaptiveAvgPool2d(1)
        r = len(config.rois)
        if config.head == "attention":
            d = config.attention_dim
            self.project = nn.Linear(dim, d)
            self.anatomy = nn.Parameter(torch.zeros(r, d))
            nn.init.normal_(self.anatomy, std=0.02)
            layer = nn.TransformerEncoderLayer(
                d_model=d, nhead=config.attention_heads, dim_feedforward=2 * d, dropout=0.1,
                batch_first=True, norm_first=True,
            )
            self.encoder = nn.TransformerEncoder(layer, num_layers=config.attention_layers, enable_nested_tensor=False)
            dim = d
        self.roi_head = nn.Linear(dim, NUM_OUTPUTS)  # shared across ROIs
        self.fused_head = nn.Linear(r * dim, NUM_OUTPUTS)
        # Heads predict standardised BMD; these buffers (set from the training labels, saved
        # with the weights) turn that into g/cm2, so every output of the module is in g/cm2.
        self.register_buffer("target_mean", torch.full((NUM_OUTPUTS,), 1.0))
        self.register_buffer("target_std", torch.full((NUM_OUTPUTS,), 0.15))

    def forward(self, x: torch.Tensor) -> MultiRoiOutput:
        """x: (B, R, S, S) or (B, R, 1, S, S) normalised grey crops in ``config.rois`` order."""
        if x.dim() == 4:
            x = x.unsqueeze(2)
        b, r = x.shape[:2]
        if r != len(self.config.rois):
            raise ValueError(f"expected {len(self.config.rois)} ROIs {self.config.rois}, got {r}")
        # grey repeated to three channels; channels-last is ~30 % faster for CPU convolutions
        flat = x.flatten(0, 1).expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)
        feats = self.pool(self.backbone(flat)).flatten(1).view(b, r, -1)
        if self.config.head == "attention":
            feats = self.encoder(self.project(feats) + self.anatomy)
        final = self.fused_head(feats.flatten(1)) * self.target_std + self.target_mean
        per_roi = self.roi_head(feats) * self.target_std + self.target_mean
        return MultiRoiOutput(final=final, per_roi=per_roi)


def multi_roi_loss(out: MultiRoiOutput, target: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Mean of the MSEs of all heads: the fused head and one per ROI. target: (B, 4) g/cm2.

    ``scale`` (the model's ``target_std``) expresses the errors in standard deviations of the
    training labels, which keeps the loss near 1 whatever the site's BMD range.
    """
    mse_final = (((out.final - target) / scale) ** 2).mean()
    mse_rois = (((out.per_roi - target[:, None, :]) / scale) ** 2).mean(dim=(0, 2))  # (R,)
    return (mse_final + mse_rois.sum()) / (1 + mse_rois.numel())


class Ensemble(nn.Module):
    """Average of several multi-ROI models' fused predictions (the papers' Table 3).

    Members may use different ROI subsets; ``forward`` takes a dict of all crops by ROI name.
    """

    def __init__(self, members: Sequence[MultiRoiNet]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one model")
        self.members = nn.ModuleList(members)
        self.rois: tuple[str, ...] = tuple(dict.fromkeys(r for m in members for r in m.config.rois))

    def forward(self, crops: torch.Tensor, roi_names: Sequence[str]) -> torch.Tensor:
        """crops: (B, R, S, S) in ``roi_names`` order -> (B, 4) mean fused prediction."""
        index = {n: i for i, n in enumerate(roi_names)}
        preds = [m(crops[:, [index[n] for n in m.config.rois]]).final for m in self.members]
        return torch.stack(preds).mean(dim=0)
