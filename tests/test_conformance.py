"""The generated Conformance Statement says what the running node does.

The SCP is asked, one association per SOP class, for every transfer syntax pydicom knows:
what it accepts must be exactly the statement's table. The objects the pipeline writes must
be the SOP classes and transfer syntaxes the statement lists for the SCU.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom import uid as uids
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from screener.cli import main
from screener.conformance import SENT_OBJECTS, accepted_contexts, proposed_contexts, statement
from screener.node.receive import ReceiveSettings
from tests.support.common import rg1_file

ALL_SYNTAXES = sorted({str(v) for v in vars(uids).values() if isinstance(v, uids.UID) and v.is_transfer_syntax})


@pytest.fixture
def settings(tmp_path: Path) -> ReceiveSettings:
    return ReceiveSettings(spool_root=tmp_path / "spool", model_id="demo-1.0", patient_salt=b"s", port=0,
                           min_free_bytes=0)


def negotiated(port: int, sop_class: str) -> set[str]:
    ae = AE(ae_title="PROBE")
    for syntax in ALL_SYNTAXES:  # one context per syntax: the SCP answers each on its own
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRBMD")
    if not assoc.is_established:
        return set()
    accepted = {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
    assoc.release()
    return accepted


def test_the_scp_accepts_exactly_what_the_statement_lists(settings: ReceiveSettings, scp) -> None:
    port = scp(settings)
    table = accepted_contexts(settings)
    assert len(ALL_SYNTAXES) <= 128 and len(table) > 5
    for context in table:
        assert negotiated(port, context.sop_class) == set(context.transfer_syntaxes), context.name
    assert negotiated(port, CTImageStorage) == set()  # and nothing it does not list


def test_the_objects_written_are_those_the_statement_sends(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["process", str(rg1_file()), "--out", str(out), "--quiet"]) == 0
    written = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
               for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in out.glob("*.dcm"))}
    assert written == set(SENT_OBJECTS.values())
    proposed = {(cx.sop_class, cx.transfer_syntaxes[0]) for cx in proposed_contexts()}
    assert set(SENT_OBJECTS.values()) <= proposed


def test_the_statement_names_every_uid_limit_and_tls(settings: ReceiveSettings, tmp_path: Path, capsys) -> None:
    text = statement(settings)
    for context in accepted_contexts(settings) + proposed_contexts():
        assert context.sop_class in text and all(ts in text for ts in context.transfer_syntaxes)
    for value in ("0xA700", "0xC210", "0xC211", "local-limit-exceeded", "ISO_IR 192", "5 s", "60 s", "16 "):
        assert value in text, value
    config = tmp_path / "node.toml"
    config.write_text("[node]\nmax_associations = 4\nmax_associations_per_peer = 2\n")
    assert main(["conformance", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# DICOM Conformance Statement") and "At most 4 associations" in printed
