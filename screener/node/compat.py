"""The pynetdicom internals the node relies on, in one place, checked against the version.

pynetdicom 3 has no public way to: give the acceptor a socket with read deadlines, start a
server built with a custom request handler in the background, or stream received datasets
to files. Each of those reaches into a private name; they are all here, so an upgrade of
pynetdicom is checked (and, if needed, fixed) in this one module. ``pyproject.toml`` pins
``pynetdicom>=3.0,<4`` and :data:`SUPPORTED_MAJOR` refuses anything else at import.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import pynetdicom
from pynetdicom import AE, _config
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

__all__ = ["SUPPORTED_MAJOR", "DeadlineSocket", "DeadlineRequestHandler", "acceptors", "enable_chunked_receive", "quiet_standard_handlers",
           "is_requested", "start_in_background"]

SUPPORTED_MAJOR = 3
if int(pynetdicom.__version__.split(".")[0]) != SUPPORTED_MAJOR:
    raise ImportError(f"screener.node needs pynetdicom {SUPPORTED_MAJOR}.x (its private socket, handler and "
                      f"server hooks are in screener/node/compat.py); pynetdicom {pynetdicom.__version__} is installed")

# Socket reads of at most this much; PDUs other than P-DATA (an association request with many
# presentation contexts) may exceed a small negotiated maximum up to this size.
_READ_SIZE = 1 << 20
LARGEST_OTHER_PDU = 1 << 20
# A PDU's deadline grows by its length at this rate (a 256 KiB PDU gets 4 s more), so an
# honest sender on a slow link is not cut off; a trickle of a few bytes a second still is.
MIN_BYTES_PER_S = 64 * 1024


def enable_chunked_receive() -> None:
    """Stream every received dataset to a file as it arrives (pynetdicom's process-wide option;
    the files go to the process's temporary directory, see screener.node.receivers)."""
    _config.STORE_RECV_CHUNKED_DATASET = True


def quiet_standard_handlers() -> None:
    """Unbind pynetdicom's own logging handlers (process-wide): they raise on some malformed
    messages (a C-STORE with an unknown Priority), and a handler that raises makes pynetdicom
    skip the handlers after it, ours among them."""
    _config.LOG_HANDLER_LEVEL = "none"


def acceptors(ae: AE) -> list[Any]:
    """The AE's live acceptor associations (connections), requested or not yet."""
    return [assoc for assoc in ae.active_associations if assoc.is_acceptor]


def is_requested(assoc: Any) -> bool:
    """Whether the peer's A-ASSOCIATE-RQ has arrived (a connection that sent nothing has not)."""
    return assoc.requestor.primitive is not None and not (assoc.is_aborted or assoc.is_released or assoc.is_rejected)


class DeadlineSocket(AssociationSocket):
    """pynetdicom's acceptor socket, with deadlines, reading each PDU in few system calls.

    pynetdicom reads a PDU as ``recv(6)`` (type and length) and then ``recv(length)``, each
    blocking until every byte is there, on a socket without a timeout: a peer that sends part
    of a PDU and then nothing, or one byte at a time, holds the connection (and its thread and
    association slot) for as long as it likes, and pynetdicom's ARTIM and idle timers, which
    the same thread checks between PDUs, never fire. Here every PDU must arrive completely
    within ``pdu_timeout_s`` of its first byte being read (plus its length at
    :data:`MIN_BYTES_PER_S`), and before the association is
    established everything must arrive within ``acse_timeout_s`` of the connection (the ARTIM
    rule, applied to the bytes as well). A read past its deadline closes the connection and
    returns short, which pynetdicom treats as the peer having closed it (Evt17).

    Reads take up to 1 MiB per call, whatever the kernel holds (pynetdicom's take 4 KiB: about
    1,800 calls for a 7 MB radiograph, each giving up and retaking the GIL). The buffer grows
    only as bytes arrive: a PDU header announcing 4 GiB allocates nothing up front. A PDU
    longer than the maximum we negotiated (and than any association request needs) closes the
    connection at once; the length is read from each header, so no sequence of PDUs can slip
    a long one past the check.
    """

    # Set by DeadlineRequestHandler right after the base class built the socket.
    _opened: float
    _acse_timeout_s: float
    _pdu_timeout_s: float
    _on_timeout: Callable[[Any, str], None]
    _on_tls_failure: Callable[[Any, str], None]
    _deadline: float = 0.0
    _expect: int | None = None  # the length the last header announced: the next read's size
    _was_established: bool = False

    def recv(self, nr_bytes: int) -> bytearray:
        # Which read this is comes from the bytes themselves, not from counting calls: after a
        # header pynetdicom may stop without reading the body (an unknown PDU type).
        body = self._expect is not None and nr_bytes == self._expect
        self._expect = None
        limit = max(self._assoc.acceptor.maximum_length, LARGEST_OTHER_PDU)
        if nr_bytes > limit:
            self._on_timeout(self._assoc, f"peer announced a PDU of {nr_bytes} bytes; at most {limit} are accepted")
            self.close()
            return bytearray()
        now = time.monotonic()
        if not body:  # a PDU's type and length: its deadline starts now
            self._deadline = now + self._pdu_timeout_s
        # and grows with the length announced, so a large PDU on a slow link still arrives
        deadline = self._deadline + (nr_bytes / MIN_BYTES_PER_S if body else 0.0)
        if self._assoc.is_established:
            self._was_established = True
        else:  # before the association (ARTIM), or after its release or abort
            deadline = min(deadline, (now if self._was_established else self._opened) + self._acse_timeout_s)
        sock = self.socket
        buffer = bytearray()
        try:
            while sock is not None and len(buffer) < nr_bytes:
                remaining = deadline - time.monotonic()
                try:
                    if remaining <= 0:
                        raise TimeoutError
                    sock.settimeout(remaining)
                    chunk = sock.recv(min(nr_bytes - len(buffer), _READ_SIZE))
                except ssl.SSLError as error:  # the DICOM TLS handshake, done on the first read
                    self._on_tls_failure(self._assoc, f"TLS handshake failed: {error.reason or error}; "
                                                      "connection closed")
                    self.close()
                    return buffer
                except (TimeoutError, socket.timeout):
                    stage = ("PDU" if self._assoc.is_established else "closing PDU" if self._was_established
                             else "association request")
                    self._on_timeout(self._assoc, f"{stage} not received in time ({len(buffer)} of {nr_bytes} "
                                                  "bytes); connection closed")
                    self.close()
                    return buffer
                if not chunk:
                    break
                buffer += chunk
        finally:
            if self.socket is not None:
                self.socket.settimeout(None)  # sends use the socket too: no leftover deadline
        if not body and nr_bytes == 6 and len(buffer) == 6:
            self._expect = struct.unpack(">L", bytes(buffer[2:6]))[0]
        return buffer


class DeadlineRequestHandler(RequestHandler):
    """pynetdicom's acceptor request handler, building associations on a DeadlineSocket.

    The server class sets ``acse_timeout_s``, ``pdu_timeout_s``, ``on_timeout`` and
    ``on_tls_failure`` on itself;
    the handler reads them from ``self.server``.
    """

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        # The base class just built the socket around our connection; a subclass that adds
        # only methods and class defaults can stand in for it.
        sock.__class__ = DeadlineSocket
        sock._opened = time.monotonic()
        sock._acse_timeout_s = self.server.acse_timeout_s
        sock._pdu_timeout_s = self.server.pdu_timeout_s
        sock._on_timeout = self.server.on_timeout
        sock._on_tls_failure = self.server.on_tls_failure
        return assoc


def start_in_background(ae: AE, server: ThreadedAssociationServer, name: str) -> None:
    """What ``AE.start_server(block=False)`` does, which has no way to pass a request handler:
    register the server with its AE (``server.shutdown()`` takes it off again) and serve in a
    daemon thread."""
    ae._servers.append(server)
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
