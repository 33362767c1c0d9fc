from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PushChunk(_message.Message):
    __slots__ = ("upload_id", "protocol_version", "total_size", "blob_digest", "metadata", "offset", "data", "chunk_digest", "chunk_crc32")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOB_DIGEST_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_DIGEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_CRC32_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    protocol_version: int
    total_size: int
    blob_digest: bytes
    metadata: _containers.ScalarMap[str, str]
    offset: int
    data: bytes
    chunk_digest: bytes
    chunk_crc32: int
    def __init__(self, upload_id: _Optional[str] = ..., protocol_version: _Optional[int] = ..., total_size: _Optional[int] = ..., blob_digest: _Optional[bytes] = ..., metadata: _Optional[_Mapping[str, str]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., chunk_digest: _Optional[bytes] = ..., chunk_crc32: _Optional[int] = ...) -> None: ...

class PushAck(_message.Message):
    __slots__ = ("upload_id", "received_bytes", "fields")
    class FieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    received_bytes: int
    fields: _containers.ScalarMap[str, str]
    def __init__(self, upload_id: _Optional[str] = ..., received_bytes: _Optional[int] = ..., fields: _Optional[_Mapping[str, str]] = ...) -> None: ...

class UploadQuery(_message.Message):
    __slots__ = ("upload_id", "protocol_version")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    protocol_version: int
    def __init__(self, upload_id: _Optional[str] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class UploadState(_message.Message):
    __slots__ = ("upload_id", "known", "received_bytes", "total_size", "blob_digest", "complete")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOB_DIGEST_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    known: bool
    received_bytes: int
    total_size: int
    blob_digest: bytes
    complete: bool
    def __init__(self, upload_id: _Optional[str] = ..., known: _Optional[bool] = ..., received_bytes: _Optional[int] = ..., total_size: _Optional[int] = ..., blob_digest: _Optional[bytes] = ..., complete: _Optional[bool] = ...) -> None: ...

class ReadAuth(_message.Message):
    __slots__ = ("sender", "timestamp_ms", "nonce", "signature")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    sender: str
    timestamp_ms: int
    nonce: bytes
    signature: bytes
    def __init__(self, sender: _Optional[str] = ..., timestamp_ms: _Optional[int] = ..., nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("model_id", "from_version", "protocol_version", "auth")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    from_version: int
    protocol_version: int
    auth: ReadAuth
    def __init__(self, model_id: _Optional[str] = ..., from_version: _Optional[int] = ..., protocol_version: _Optional[int] = ..., auth: _Optional[_Union[ReadAuth, _Mapping]] = ...) -> None: ...

class VersionMessage(_message.Message):
    __slots__ = ("model_id", "version", "data", "offset", "total_size", "chunk_digest", "blob_digest", "chunk_crc32")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_DIGEST_FIELD_NUMBER: _ClassVar[int]
    BLOB_DIGEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_CRC32_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    version: int
    data: bytes
    offset: int
    total_size: int
    chunk_digest: bytes
    blob_digest: bytes
    chunk_crc32: int
    def __init__(self, model_id: _Optional[str] = ..., version: _Optional[int] = ..., data: _Optional[bytes] = ..., offset: _Optional[int] = ..., total_size: _Optional[int] = ..., chunk_digest: _Optional[bytes] = ..., blob_digest: _Optional[bytes] = ..., chunk_crc32: _Optional[int] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("model_id", "version", "protocol_version", "auth")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    version: int
    protocol_version: int
    auth: ReadAuth
    def __init__(self, model_id: _Optional[str] = ..., version: _Optional[int] = ..., protocol_version: _Optional[int] = ..., auth: _Optional[_Union[ReadAuth, _Mapping]] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("protocol_version", "envelope")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    envelope: bytes
    def __init__(self, protocol_version: _Optional[int] = ..., envelope: _Optional[bytes] = ...) -> None: ...

class ReportAck(_message.Message):
    __slots__ = ("fields",)
    class FieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    fields: _containers.ScalarMap[str, str]
    def __init__(self, fields: _Optional[_Mapping[str, str]] = ...) -> None: ...

class FetchChunk(_message.Message):
    __slots__ = ("model_id", "version", "data", "offset", "total_size", "chunk_digest", "blob_digest", "chunk_crc32")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_DIGEST_FIELD_NUMBER: _ClassVar[int]
    BLOB_DIGEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_CRC32_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    version: int
    data: bytes
    offset: int
    total_size: int
    chunk_digest: bytes
    blob_digest: bytes
    chunk_crc32: int
    def __init__(self, model_id: _Optional[str] = ..., version: _Optional[int] = ..., data: _Optional[bytes] = ..., offset: _Optional[int] = ..., total_size: _Optional[int] = ..., chunk_digest: _Optional[bytes] = ..., blob_digest: _Optional[bytes] = ..., chunk_crc32: _Optional[int] = ...) -> None: ...
