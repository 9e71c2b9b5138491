"""The two binary wire formats between the worker's processes: encode, decode, constants and size limits, in one
place. Pure byte handling (struct, json, one socket helper pair): imported by the worker (``slots.py``,
``forkserver.ForkServer``), the fork server and every job child, so it stays small and imports nothing of the
runtime.

Report pipe (job child -> worker; written by ``child.py``, read by ``slots.Slot``)
----------------------------------------------------------------------------------
A stream of frames ``kind (1 byte) | length (4 bytes, big-endian) | JSON body (length bytes)``:

=====  ===================================================================================================
kind   body
=====  ===================================================================================================
``C``  a checkpoint (any JSON value, at most ``MAX_CHECKPOINT`` bytes); the last one counts
``R``  the final report: ``{"status": "ok"|"error"|"bad", ...}``; the worker records the job from it at once
``I``  the final report of an interrupted run: the job goes back to a queue, so the worker waits for the exit
       (and the end of the run's process group) first
=====  ===================================================================================================

A frame whose kind is unknown or whose length is over ``MAX_REPORT_FRAME`` means the job wrote on the pipe's file
descriptor itself: :func:`decode_report` raises :class:`Garbled` and the reader ignores the rest of the pipe. A
final report is at most a ``MAX_RESULT`` result plus a traceback; the success report is the constant ``OK_REPORT``
(nothing encoded on the hot path).

Fork-server socket (a Unix stream socket between the worker and the fork server, ``forkserver.py``)
---------------------------------------------------------------------------------------------------
Worker to server, one message per job (:func:`send_job` / :func:`recv_job`): ``length (4 bytes) | seq (8 bytes)``
(big-endian), then the payload JSON (length bytes); the write end of the job's report pipe rides on the first
chunk (SCM_RIGHTS). The same message goes from the fork server to its pre-forked spare child.

Server to worker, fixed frames ``kind (1 byte) | seq (8 bytes) | value (8 bytes)`` (signed, big-endian), read by
:func:`decode_server_frame`:

=====  =========  =============  =====================================================================
kind   seq        value          then
=====  =========  =============  =====================================================================
``P``  job's seq  child pid      -- the child has the job
``S``  job's seq  wait status    -- the child is reaped, and what it left running is ended
``R``  0          server pid     length (4 bytes) and the JSON job registry (queue, timeout, retries
                                 of each job name), once, when the app is imported
``E``  0          0              length (4 bytes) and a JSON string: a one-line start-up error
=====  =========  =============  =====================================================================

Every ``P``/``S`` names the job it is about, so a late frame can never be taken for another job's. Any other kind
raises :class:`UnknownFrame` (the worker replaces the server).
"""
from __future__ import annotations

import json
import socket
import struct
from typing import Optional, Tuple

# --- report pipe ------------------------------------------------------------------------------------------------

REPORT_HEAD = struct.Struct(">cI")
CHECKPOINT, REPORT, INTERRUPTED = b"C", b"R", b"I"
REPORT_KINDS = (CHECKPOINT, REPORT, INTERRUPTED)
#: Largest checkpoint (JSON bytes). It travels in the job's payload when the job is put back.
MAX_CHECKPOINT = 64 * 1024
#: JSON bytes of a return value kept for get_job (RESULT_TTL).
MAX_RESULT = 512 * 1024
#: A report frame is at most a 512 KiB result plus a traceback; a checkpoint 64 KiB. Larger: not ours.
MAX_REPORT_FRAME = 2 << 20


class Garbled(ValueError):
    """The report pipe holds bytes that are not our frames (the job wrote on its file descriptor)."""


def report_frame(kind: bytes, body: bytes) -> bytes:
    """One report-pipe frame around the JSON ``body``."""
    return REPORT_HEAD.pack(kind, len(body)) + body


#: The report of a job that returned None: the common case, encoded once.
OK_REPORT = report_frame(REPORT, b'{"status":"ok"}')


def decode_report(buf, at: int = 0) -> Optional[Tuple[bytes, bytes, int]]:
    """The frame at ``buf[at:]`` as ``(kind, body, end)``, or None while it is incomplete. Raises :class:`Garbled`
    as soon as a header is not ours (before its body arrives)."""
    head = REPORT_HEAD.size
    if len(buf) - at < head:
        return None
    kind, n = REPORT_HEAD.unpack_from(buf, at)
    if kind not in REPORT_KINDS or n > MAX_REPORT_FRAME:
        raise Garbled(kind)
    if len(buf) - at - head < n:
        return None
    return kind, bytes(buf[at + head:at + head + n]), at + head + n


# --- fork-server socket -----------------------------------------------------------------------------------------

SERVER_FRAME = struct.Struct(">cqq")
JOB_HEAD = struct.Struct(">IQ")
BODY_LEN = struct.Struct(">I")
STARTED, REAPED, READY, FAILED = b"P", b"S", b"R", b"E"
#: Payload bytes sent with the job header in the first chunk (the one carrying the report pipe's descriptor).
FIRST_CHUNK = 65536


class UnknownFrame(ValueError):
    """The fork server sent a frame kind this worker does not know."""


def server_frame(kind: bytes, seq: int, value: int, body=None) -> bytes:
    """A fork-server frame; ``body`` (``R``/``E`` only) follows as length-prefixed JSON."""
    data = SERVER_FRAME.pack(kind, seq, value)
    if body is not None:
        blob = json.dumps(body).encode()
        data += BODY_LEN.pack(len(blob)) + blob
    return data


def decode_server_frame(buf: bytes):
    """The frame at the start of ``buf`` as ``(kind, seq, value, body, size)`` (``body`` None for ``P``/``S``), or
    None while it is incomplete. Raises :class:`UnknownFrame` for a kind not listed in the module docstring."""
    if len(buf) < SERVER_FRAME.size:
        return None
    kind, seq, value = SERVER_FRAME.unpack_from(buf)
    size, body = SERVER_FRAME.size, None
    if kind in (READY, FAILED):  # followed by a length-prefixed JSON body
        if len(buf) < size + BODY_LEN.size:
            return None
        n = BODY_LEN.unpack_from(buf, size)[0]
        if len(buf) < size + BODY_LEN.size + n:
            return None
        body = json.loads(buf[size + BODY_LEN.size:size + BODY_LEN.size + n])
        size += BODY_LEN.size + n
    elif kind not in (STARTED, REAPED):
        raise UnknownFrame(kind)
    return kind, seq, value, body, size


def send_job(sock: socket.socket, seq: int, data: bytes, report_w: int) -> None:
    """One job message: header, payload, and the report pipe's write end riding on the first chunk."""
    head = JOB_HEAD.pack(len(data), seq) + data[:FIRST_CHUNK]
    sent = socket.send_fds(sock, [head], [report_w])
    rest = head[sent:] + data[FIRST_CHUNK:]
    if rest:  # sendall(b"") still calls send(): EPIPE if the reader already took the message and closed
        sock.sendall(rest)


def recv_job(sock: socket.socket):
    """``(seq, payload bytes, report fd)``, or None at end of file (the sender is gone; a sender that left frames of
    ours unread resets the connection, which means the same)."""
    try:
        msg, fds, _, _ = socket.recv_fds(sock, FIRST_CHUNK + JOB_HEAD.size, 1)
        if len(msg) < JOB_HEAD.size or not fds:
            return None
        need, seq = JOB_HEAD.unpack_from(msg)
        data = msg[JOB_HEAD.size:]
        while len(data) < need:
            more = sock.recv(need - len(data))
            if not more:
                return None
            data += more
    except ConnectionResetError:
        return None
    return seq, data, fds[0]
