"""How the networks run (config [model] precision, channels_last, compile): every option gives
the fp32 reference's numbers within the stated tolerance, on the real Philips CR films.

The speed of each option is measured in bench/throughput.py and bench/pipeline_timing.py, not
here. On this CPU, bf16 and fp16 run through torch.autocast's CPU kernels: the same code path a
GPU takes, with other kernels underneath.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file

from screener.config import PRECISIONS, ConfigError, ModelSettings, build_inference
from screener.pipeline.bundle import ModelBundle
from screener.pipeline.decode import decode_file
from screener.pipeline import estimate
from screener.pipeline.estimate import BF16_TOLERANCE_G_CM2, BmdEstimator, Inference, Precision, cpu_has_fast_bf16
from screener.pipeline.geometry import Pyramid


@pytest.fixture(scope="module")
def films():
    bundle = ModelBundle.load()
    pyramids = [Pyramid(decode_file(get_testdata_file(n)).pixels) for n in ("RG1_UNCR.dcm", "RG1_J2KI.dcm")]
    reference = BmdEstimator(bundle, "cpu", Inference(precision=Precision.FP32, channels_last=False))
    landmarks = reference.detect(pyramids)
    bmd = np.array([e.bmd for e in reference.estimate(pyramids, ["F", "M"], landmarks=landmarks)])
    return bundle, pyramids, landmarks, bmd


def _bmd(films, inference: Inference) -> np.ndarray:
    bundle, pyramids, landmarks, _ = films
    estimator = BmdEstimator(bundle, "cpu", inference)
    return np.array([e.bmd for e in estimator.estimate(pyramids, ["F", "M"], landmarks=landmarks)])


@pytest.mark.parametrize("precision", [Precision.BF16, Precision.FP16])
def test_half_precision_stays_within_the_stated_tolerance_of_fp32(films, precision) -> None:
    reference = films[3]
    half = _bmd(films, Inference(precision=precision))
    assert np.abs(half - reference).max() <= BF16_TOLERANCE_G_CM2
    # and autocast did run in half precision: the numbers are not bit-identical to fp32
    assert not np.array_equal(half, reference)
    # and every result says so (the SR's Algorithm Parameters, the stored result document)
    assert BmdEstimator(films[0], "cpu", Inference(precision=precision)).algorithm.precision == precision.value
    assert BmdEstimator(films[0], "cpu", Inference(precision=Precision.AUTO)).algorithm.precision == "fp32"


def test_channels_last_is_a_layout_not_a_result(films) -> None:
    np.testing.assert_allclose(_bmd(films, Inference(precision=Precision.FP32, channels_last=True)), films[3],
                               atol=1e-5)


def test_native_bf16_is_read_from_the_cpu_flags_and_auto_stays_fp32_on_the_cpu(monkeypatch) -> None:
    assert cpu_has_fast_bf16(frozenset({"fpu", "avx512f", "amx_bf16", "amx_tile"}))  # Sapphire Rapids
    assert cpu_has_fast_bf16(frozenset({"fpu", "avx512f", "avx512_bf16"}))  # Zen 4, Cooper Lake
    assert not cpu_has_fast_bf16(frozenset({"fpu", "avx2", "avx512f"}))  # emulated: slower than fp32
    assert not cpu_has_fast_bf16(frozenset())  # flags unknown (not Linux)
    for native in (True, False):  # the processor does not change the numbers unless asked
        monkeypatch.setattr(estimate, "cpu_has_fast_bf16", lambda native=native: native)
        assert Precision.AUTO.resolve(torch.device("cpu")) is Precision.FP32
    assert Precision.BF16.resolve(torch.device("cpu")) is Precision.BF16  # asked for: given


def test_the_node_tells_an_administrator_whose_cpu_has_native_bf16(monkeypatch) -> None:
    from screener.service import precision_hint

    monkeypatch.setattr(estimate, "cpu_has_fast_bf16", lambda: True)
    assert 'precision = "bf16"' in precision_hint("cpu", "auto")
    assert precision_hint("cpu", "bf16") is None  # already asked for
    assert precision_hint("cpu", "fp32") is None  # chosen on purpose
    monkeypatch.setattr(estimate, "cpu_has_fast_bf16", lambda: False)
    assert precision_hint("cpu", "auto") is None  # emulated bf16 would be slower


def test_config_precision_words_are_the_pipelines() -> None:
    assert set(PRECISIONS) == {p.value for p in Precision}
    assert build_inference(ModelSettings(precision="bf16", channels_last=False, compile=True)) == Inference(
        precision=Precision.BF16, channels_last=False, compile=True)
    with pytest.raises(ConfigError, match=r"model.precision = 'half'.*auto, fp32, bf16, fp16"):
        ModelSettings(precision="half")


@pytest.mark.slow
def test_torch_compile_gives_the_eager_numbers(films) -> None:
    """model.compile = true: inductor compiles the BMD network (about a minute on this CPU)."""
    np.testing.assert_allclose(_bmd(films, Inference(precision=Precision.FP32, compile=True)), films[3], atol=1e-5)
