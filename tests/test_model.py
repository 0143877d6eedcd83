"""Multi-ROI network: shapes per backbone and head, the 8-head loss, ensembles, validation."""

from __future__ import annotations

import pytest
import torch

from screener.pipeline.landmarks import LandmarkNet, soft_argmax
from screener.pipeline.model import Ensemble, MultiRoiConfig, MultiRoiNet, MultiRoiOutput, multi_roi_loss
from screener.pipeline.rois import ROI_NAMES


@pytest.mark.parametrize("backbone", ["vgg16", "resnet18", "resnet50"])
@pytest.mark.parametrize("head", ["concat", "attention"])
def test_output_shapes(backbone: str, head: str) -> None:
    net = MultiRoiNet(MultiRoiConfig(backbone=backbone, head=head, roi_size=32)).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 7, 32, 32))
    assert out.final.shape == (2, 4) and out.per_roi.shape == (2, 7, 4)
    assert torch.isfinite(out.final).all()


def test_paper_layout_concat_head_sees_seven_512_vectors() -> None:
    net = MultiRoiNet(MultiRoiConfig(backbone="vgg16", roi_size=32))
    assert net.fused_head.in_features == 7 * 512 and net.roi_head.in_features == 512


def test_single_roi_model_and_wrong_roi_count() -> None:
    net = MultiRoiNet(MultiRoiConfig(backbone="resnet18", rois=("whole_image",), roi_size=32))
    out = net(torch.randn(3, 1, 32, 32))
    assert out.final.shape == (3, 4) and out.per_roi.shape == (3, 1, 4)
    with pytest.raises(ValueError, match="expected 1 ROIs"):
        net(torch.randn(3, 7, 32, 32))


def test_loss_is_mean_of_all_eight_heads() -> None:
    target = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    final = torch.full((1, 4), 1.5)  # squared error 0.25
    per_roi = torch.ones(1, 7, 4)  # perfect
    per_roi[0, 0] = 2.0  # squared error 1.0 on one head
    loss = multi_roi_loss(MultiRoiOutput(final=final, per_roi=per_roi), target)
    assert loss.item() == pytest.approx((0.25 + 1.0) / 8)
    assert multi_roi_loss(MultiRoiOutput(final, per_roi), target, scale=0.5).item() == pytest.approx(4 * (0.25 + 1.0) / 8)


def test_outputs_are_in_label_units() -> None:
    net = MultiRoiNet(MultiRoiConfig(backbone="resnet18", roi_size=32))
    net.target_mean.fill_(0.9)
    net.target_std.zero_()
    out = net(torch.randn(1, 7, 32, 32))
    assert torch.allclose(out.final, torch.full((1, 4), 0.9))


def test_ensemble_averages_members_with_different_roi_subsets() -> None:
    a = MultiRoiNet(MultiRoiConfig(backbone="resnet18", roi_size=32)).eval()
    b = MultiRoiNet(MultiRoiConfig(backbone="resnet18", rois=("t12", "whole_image"), roi_size=32)).eval()
    x = torch.randn(2, 7, 32, 32)
    with torch.no_grad():
        expected = (a(x).final + b(x[:, [ROI_NAMES.index("t12"), ROI_NAMES.index("whole_image")]]).final) / 2
        got = Ensemble([a, b]).eval()(x, ROI_NAMES)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"backbone": "alexnet"}, "backbone"), ({"head": "lstm"}, "head"), ({"rois": ("spleen",)}, "unknown"),
     ({"rois": ()}, "non-empty"), ({"roi_size": 8}, "roi_size")],
)
def test_config_errors_name_the_option(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        MultiRoiConfig(**kwargs)


def test_config_round_trip() -> None:
    cfg = MultiRoiConfig(backbone="resnet34", head="attention", rois=("t12", "whole_image"), roi_size=64)
    assert MultiRoiConfig.from_dict(cfg.to_dict()) == cfg


def test_landmark_net_heatmaps_and_soft_argmax() -> None:
    net = LandmarkNet(width=16).eval()
    with torch.no_grad():
        logits = net(torch.randn(2, 1, 64, 64))
    assert logits.shape == (2, 16, 16, 16)
    peaked = torch.full((1, 1, 16, 16), -50.0)
    peaked[0, 0, 5, 11] = 50.0  # row 5, column 11
    xy, conf, _ = soft_argmax(peaked)
    torch.testing.assert_close(xy[0, 0], torch.tensor([11.0, 5.0]))
    assert conf.item() == pytest.approx(1.0)
    _, flat_conf, _ = soft_argmax(torch.zeros(1, 1, 16, 16))
    assert flat_conf.item() < 0.1  # a diffuse heatmap is not confident
