"""Typed errors for everything that crosses a wire.

Every error names what was wrong and, where it helps, what to do. Servers map
``RejectedError`` subclasses to a gRPC status code plus this message; a daemon never dies on
someone else's bad message, it rejects it and carries on.
"""

from __future__ import annotations


class CommsError(Exception):
    """Base class of every error raised by ``comms``."""


class ProtocolVersionError(CommsError):
    """A peer speaks another wire-protocol version."""


class RejectedError(CommsError):
    """Input from a peer that is refused. ``reason`` is a short stable tag used in metrics."""

    reason = "rejected"
    # Name of the grpc.StatusCode member a server answers with.
    grpc_code = "INVALID_ARGUMENT"

    def __init__(self, message: str, *, reason: str | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class MalformedError(RejectedError):
    """Bytes that do not parse: bad magic, truncated frame, bad msgpack, inconsistent fields."""

    reason = "malformed"


class DigestMismatchError(RejectedError):
    """A payload or chunk whose digest does not match the one declared for it."""

    reason = "digest"
    grpc_code = "DATA_LOSS"


class OversizeError(RejectedError):
    """A payload, chunk or message larger than the configured limit."""

    reason = "oversize"
    grpc_code = "RESOURCE_EXHAUSTED"


class NonFiniteError(RejectedError):
    """A tensor holding NaN or Inf."""

    reason = "nonfinite"


class ShapeMismatchError(RejectedError):
    """A tensor whose name, shape or dtype disagrees with the model's manifest."""

    reason = "shape"


class SignatureError(RejectedError):
    """A missing or forged signature."""

    reason = "signature"
    grpc_code = "UNAUTHENTICATED"


class UnknownPeerError(RejectedError):
    """A sender that is not in the roster, or not in the role it claims."""

    reason = "unknown_peer"
    grpc_code = "PERMISSION_DENIED"


class ReplayError(RejectedError):
    """A (sender, sequence) pair at or below one already accepted."""

    reason = "replay"
    grpc_code = "ALREADY_EXISTS"


class StaleError(RejectedError):
    """An update staler than the configured bound."""

    reason = "stale"
    grpc_code = "FAILED_PRECONDITION"


class NormBoundError(RejectedError):
    """An update whose L2 norm exceeds the aggregator's bound, refused because the aggregator
    is set to reject rather than clip (``merge.clip_action = "reject"``)."""

    reason = "norm_bound"


class DirectionError(RejectedError):
    """An island update pointing against the model's last merged step (its cosine with it
    below the aggregator's ``merge.direction_min_cos``), refused (``merge.direction``)."""

    reason = "direction"


class GroupError(RejectedError):
    """An island delta for a model whose expert group does not list that island, or from an
    island of another model's group (the aggregator's ``[[expert_groups]]``)."""

    reason = "group"
    grpc_code = "PERMISSION_DENIED"


class NotFoundError(RejectedError):
    """A model id or version that the server does not hold."""

    reason = "not_found"
    grpc_code = "NOT_FOUND"


class ReadDeniedError(RejectedError):
    """A Fetch or Subscribe refused for its read signature (``comms.reads``): unsigned, from a
    key not in the roster, badly signed, outside the time window, or replayed. ``reason``
    says which."""

    reason = "read_denied"
    grpc_code = "PERMISSION_DENIED"


class TooManyReadsError(RejectedError):
    """More signed reads within the replay window than the server remembers nonces for."""

    reason = "too_many_reads"
    grpc_code = "RESOURCE_EXHAUSTED"


class StorageError(RejectedError):
    """A write the server could not make durable (its disk is full, read-only or failing):
    nothing was acknowledged. Transient: the status is UNAVAILABLE, so the sender keeps the
    update and retries later. ``reason`` is ``disk_full`` (no space, quota, file size limit)
    or ``disk_error`` (I/O error, read-only file system)."""

    reason = "disk_full"
    grpc_code = "UNAVAILABLE"


class LinkError(CommsError):
    """A link went down or dropped data; callers retry or resume."""


class ConfigError(CommsError):
    """A bad configuration file or key; the message names the file and the key."""
