"""Transport errors and their mapping to gRPC statuses and back.

A server maps a ``comms.errors.RejectedError`` (or a protocol version mismatch) to its status
code, with the error's class name and reason in the trailing metadata; anything else becomes
INTERNAL and is logged. A client turns the status back into a typed error: a
``RemoteRejected`` subclass that is also the matching ``comms.errors`` class, so
``except StaleError`` catches a remote stale rejection.
"""

from __future__ import annotations

import logging

import grpc

from comms import PROTOCOL_VERSION
from comms import errors as _errors
from comms.chunks import OffsetMismatchError
from comms.errors import CommsError, LinkError, ProtocolVersionError, RejectedError

log = logging.getLogger("comms.transport")

ERROR_TYPE_KEY = "archipelago-error"  # trailing metadata: the comms.errors class name
REASON_KEY = "archipelago-reason"  # trailing metadata: the error's stable reason tag


class RemoteError(CommsError):
    """The server answered with an error status. ``code`` is a ``grpc.StatusCode``."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str | None = None):
        Exception.__init__(self, f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason or code.name.lower()


class RemoteRejected(RemoteError):
    """The server refused the request; subclasses are also the matching comms.errors class."""


class DeadlineExceededError(LinkError, TimeoutError):
    """A call ran past its deadline (a slow link, or a server that did not answer)."""


class SupersededError(RejectedError):
    """A push stream replaced by a newer push of the same upload id."""

    reason = "superseded"
    grpc_code = "ABORTED"


# Errors that cross the wire by class name: every RejectedError in comms.errors, and these.
_WIRE_ERRORS: frozenset[type[CommsError]] = frozenset(
    {OffsetMismatchError, SupersededError, ProtocolVersionError}
    | {c for c in vars(_errors).values() if isinstance(c, type) and issubclass(c, RejectedError)}
)
# One client-side class per wire error, e.g. RemoteStaleError(RemoteRejected, StaleError).
_REMOTE_TYPES: dict[str, type[RemoteRejected]] = {
    cls.__name__: type(f"Remote{cls.__name__}", (RemoteRejected, cls), {"__doc__": cls.__doc__})
    for cls in _WIRE_ERRORS
}


def remote_error(err: grpc.aio.AioRpcError) -> RemoteError:
    """The typed client-side exception for a failed call's status and trailing metadata."""
    meta = {key: value for key, value in (err.trailing_metadata() or ())}
    cls = _REMOTE_TYPES.get(meta.get(ERROR_TYPE_KEY, ""), RemoteError)
    return cls(err.code(), err.details() or "", meta.get(REASON_KEY))


def _status_of(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str, tuple]:
    """Map an exception raised while serving ``method`` to (code, details, trailing md)."""
    if isinstance(exc, RejectedError | ProtocolVersionError):
        wire = next(c for c in type(exc).__mro__ if c in _WIRE_ERRORS)
        code_name = getattr(exc, "grpc_code", "FAILED_PRECONDITION")
        reason = getattr(exc, "reason", "protocol_version")
        trailing = ((ERROR_TYPE_KEY, wire.__name__), (REASON_KEY, reason))
        return grpc.StatusCode[code_name], str(exc), trailing
    log.error("unexpected error in %s", method, exc_info=exc)
    details = f"internal error in {method} ({type(exc).__name__}); see the server log"
    return grpc.StatusCode.INTERNAL, details, ((REASON_KEY, "internal"),)


def check_protocol_version(theirs: int) -> None:
    if theirs != PROTOCOL_VERSION:
        raise ProtocolVersionError(
            f"protocol version mismatch: peer speaks {theirs}, this server speaks "
            f"{PROTOCOL_VERSION}; run the same archipelago release on both sides"
        )
