"""Configuration: defaults, the example file, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from screener.config import (
    ConfigError,
    Settings,
    build_decode_limits,
    build_eligibility_rules,
    load_config,
    parse_config,
)
from screener.pipeline.decode import DecodeLimits
from screener.pipeline.eligibility import EligibilityRules

EXAMPLE = Path(__file__).resolve().parents[1] / "config.example.toml"


def test_defaults_are_the_pipeline_defaults() -> None:
    settings = parse_config({})
    assert settings == Settings()
    assert build_eligibility_rules(settings.eligibility) == EligibilityRules()
    assert build_decode_limits(settings.decode) == DecodeLimits()


def test_example_file_spells_out_the_defaults() -> None:
    assert load_config(EXAMPLE) == Settings()


def test_values_reach_the_pipeline(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(
        '[decode]\nmax_side = 4096\n\n[eligibility]\nmissing_age = "reject"\nmin_age = 65\n'
        'views = ["PA"]\naccept_secondary_capture = true\n'
    )
    settings = load_config(path)
    rules = build_eligibility_rules(settings.eligibility)
    assert rules.missing_age == "reject" and rules.min_age == 65.0 and rules.views == ("PA",)
    assert rules.accept_secondary_capture is True
    assert build_decode_limits(settings.decode) == DecodeLimits(max_side=4096)
    assert settings.to_dict()["eligibility"]["views"] == ("PA",)


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("decode", "min_side", 0),
        ("decode", "min_side", "128"),
        ("decode", "max_side", 100000),
        ("decode", "max_pixels", -1),
        ("decode", "max_pixels", True),
        ("eligibility", "sop_classes", ["1.2.840.10008.5.1.4.1.1.x"]),
        ("eligibility", "sop_classes", "1.2.840.10008.5.1.4.1.1.1"),
        ("eligibility", "accept_secondary_capture", "yes"),
        ("eligibility", "modalities", ["CR", 3]),
        ("eligibility", "body_parts", []),
        ("eligibility", "missing_body_part", "sometimes"),
        ("eligibility", "views", "PA"),
        ("eligibility", "missing_view", "maybe"),
        ("eligibility", "accept_derived_primary", 1),
        ("eligibility", "min_age", "fifty"),
        ("eligibility", "min_age", 200),
        ("eligibility", "missing_age", "ask"),
        ("eligibility", "min_landmark_confidence", 1.5),
        ("eligibility", "min_thorax_width", 1.2),
        ("eligibility", "max_spine_tilt_deg", 0),
        ("eligibility", "min_roi_inside", -0.1),
        ("eligibility", "inverted_margin", -1),
        ("eligibility", "min_heart_side_contrast", 2.0),
        ("node", "ae_title", "WAY-TOO-LONG-AE-TITLE"),
        ("node", "bind_address", "localhost:104"),
        ("node", "port", 70000),
        ("node", "allowed_calling_aes", ["OK", "BAD\\AE"]),
        ("node", "allowed_peers", ["10.0.0.300"]),
        ("node", "max_dataset_bytes", 0),
        ("node", "min_free_mb", -5),
        ("storage", "data_dir", ""),
        ("storage", "database_url", "screener.db"),
        ("storage", "retention_days", 0),
        ("storage", "patient_id_salt", 42),
        ("worker", "workers", 65),
        ("worker", "lease_seconds", -1),
        ("worker", "max_attempts", 0),
        ("worker", "poll_seconds", 0),
        ("worker", "decode_workers", 100),
        ("dispatch", "calling_ae", ""),
        ("dispatch", "max_attempts", 0),
        ("dispatch", "backoff_base_s", -1),
        ("dispatch", "backoff_cap_s", 0.5),
        ("dispatch", "interval_s", 0),
        ("backfill", "source_ae_title", "A\\B"),
        ("backfill", "source_port", 0),
        ("backfill", "associations", 0),
        ("backfill", "images_per_minute", -1),
        ("backfill", "quiet_hours", "7-19"),
        ("backfill", "quiet_hours", "07:00-07:00"),
        ("backfill", "max_queued_jobs", 0),
        ("backfill", "query_days", 0),
        ("backfill", "lease_seconds", 0),
    ],
)
def test_bad_value_names_the_key(section: str, key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
        parse_config({section: {key: value}})


def test_min_over_max_names_both() -> None:
    with pytest.raises(ConfigError, match=r"decode\.min_side .* max_side"):
        parse_config({"decode": {"min_side": 600, "max_side": 500}})


def test_unknown_keys_and_sections_are_errors() -> None:
    with pytest.raises(ConfigError, match=r"eligibility\.min_ages: unknown key"):
        parse_config({"eligibility": {"min_ages": 50}})
    with pytest.raises(ConfigError, match=r"\[eligibilty\]: unknown section"):
        parse_config({"eligibilty": {}})
    with pytest.raises(ConfigError, match=r"\[decode\] must be a table"):
        parse_config({"decode": 3})


def test_model_section_still_validated() -> None:
    with pytest.raises(ConfigError, match=r"model\.device"):
        parse_config({"model": {"device": "tpu"}})
    with pytest.raises(ConfigError, match=r"model\.batch_size"):
        parse_config({"model": {"batch_size": True}})


def test_relative_bundle_path_is_relative_to_the_config_file(tmp_path, monkeypatch) -> None:
    import shutil

    from screener.config import load_config
    from screener.pipeline.bundle import demo_bundle_path

    shutil.copytree(demo_bundle_path(), tmp_path / "etc" / "bundle")
    (tmp_path / "etc" / "screener.toml").write_text('[model]\nbundle = "bundle"\n')
    monkeypatch.chdir(tmp_path)  # not the config's folder
    assert load_config(tmp_path / "etc" / "screener.toml").model.bundle == str((tmp_path / "etc" / "bundle").resolve())


@pytest.mark.parametrize(
    "entry, pattern",
    [
        ({"name": "pacs", "ae_title": "PACS", "host": "h", "port": 0}, r"destinations\[0\].*port"),
        ({"name": "pacs", "ae_title": "", "host": "h"}, r"destinations\[0\].*ae_title"),
        ({"name": "pacs", "ae_title": "PACS", "host": ""}, r"destinations\[0\].*host"),
        ({"name": "pacs", "ae_title": "PACS", "host": "h", "send_sr": "yes"}, r"destinations\[0\]\.send_sr"),
        ({"name": "pacs", "ae_title": "PACS", "host": "h", "tls": True}, r"destinations\[0\]\.tls: unknown key"),
    ],
)
def test_bad_destination_names_the_entry(entry: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        parse_config({"destinations": [entry]})


def test_destinations_and_data_dir(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "screener.toml"
    path.parent.mkdir()
    path.write_text('[storage]\ndata_dir = "data"\n\n[[destinations]]\nname = "pacs"\nae_title = "PACS"\n'
                    'host = "127.0.0.1"\nport = 4242\nsend_gsps = false\n')
    settings = load_config(path)
    assert settings.data_dir == (tmp_path / "etc" / "data").resolve()
    (dest,) = settings.destinations
    assert dest.destination().kinds() == ("sr", "image", "pdf")  # result image and PDF on by default
    only_pictures = parse_config({"destinations": [{"name": "viewer", "ae_title": "V", "host": "h", "send_sr": False,
                                                    "send_gsps": False, "send_pdf": False}]})
    assert only_pictures.destinations[0].destination().kinds() == ("image",)
    with pytest.raises(ConfigError, match=r"send_result_image"):
        parse_config({"destinations": [{"name": "v", "ae_title": "V", "host": "h", "send_result_image": "yes"}]})
    with pytest.raises(ConfigError, match=r"destinations\[1\]\.name .* used twice"):
        parse_config({"destinations": [{"name": "a", "ae_title": "A", "host": "h"}] * 2})
    with pytest.raises(ConfigError, match=r"destinations: use \[\[destinations\]\]"):
        parse_config({"destinations": {"name": "a"}})


def test_destination_tls_files_resolved_and_checked(tmp_path: Path) -> None:
    from screener.config import ConfigError, load_config

    (tmp_path / "ca.pem").write_text("x")
    base = '[[destinations]]\nname = "p"\nae_title = "PACS"\nhost = "h"\n'
    config = tmp_path / "c.toml"
    config.write_text(base + 'tls_ca_file = "ca.pem"\n')
    [dest] = load_config(config).destinations
    assert dest.destination().tls.ca_file == (tmp_path / "ca.pem").resolve()
    config.write_text(base + 'tls_ca_file = "missing.pem"\n')
    with pytest.raises(ConfigError, match=r"destinations\[0\]\.tls_ca_file: file not found"):
        load_config(config)
    config.write_text(base + 'tls_ca_file = "ca.pem"\ntls_cert_file = "ca.pem"\n')
    with pytest.raises(ConfigError, match=r"destinations\[0\]\.tls_key_file"):
        load_config(config)
    config.write_text(base)
    assert load_config(config).destinations[0].destination().tls is None


@pytest.mark.parametrize(("config_class", "layer_class"), [
    ("NodeSettings", "screener.node.receive.ReceiveSettings"),
    ("DispatchConfig", "screener.node.dispatch.DispatchSettings"),
])
def test_config_defaults_match_the_layer_they_configure(config_class: str, layer_class: str) -> None:
    """The config sections repeat the network layer's defaults (importing it would slow every
    config load by the pynetdicom import); this keeps the two copies equal."""
    import dataclasses
    import importlib

    import screener.config as config

    module, name = layer_class.rsplit(".", 1)
    layer = getattr(importlib.import_module(module), name)
    ours = {f.name: f.default for f in dataclasses.fields(getattr(config, config_class))}
    theirs = {f.name: f.default for f in dataclasses.fields(layer)}
    shared = set(ours) & set(theirs)
    assert len(shared) >= 4
    assert {k: ours[k] for k in shared} == {k: theirs[k] for k in shared}
