"""Tensor codecs: the bytes one tensor becomes on the wire, and error feedback.

A codec turns one floating-point array into a payload (``encode``) and back into a float32
array (``decode``). The payload holds values only: the tensor's shape and the codec's spec
travel outside it, in the envelope. Every codec knows its exact payload size
(``encoded_nbytes``), so a receiver checks the size before touching the bytes, and every codec
documents a per-element error bound (``error_bound``) that the tests check.

Codecs, by name:

- ``none``: raw float32.
- ``fp16``, ``bf16``: half-precision casts, round to nearest even; saturating at the format's
  largest finite value.
- ``int8``, ``int4``: blockwise absmax quantization (symmetric, round to nearest, one float32
  scale per block), as in Dettmers et al., "8-bit Optimizers via Block-wise Quantization"
  (2022): ``q = rint(x * qmax / absmax(block))``, ``x' = q * absmax(block) / qmax``.
- ``topk``: the largest-magnitude fraction of the entries, as (index, value) pairs; the rest
  are zero (Stich et al., "Sparsified SGD with Memory", 2018).
- ``sparse2``: top-k chosen per chunk of the flattened tensor (uint16 offsets within the chunk),
  each kept value sent in 2 bits (sign, and one of two per-chunk float32 magnitudes), as in
  SparseLoCo (Sarfi et al., "Communication Efficient LLM Pre-training with SparseLoCo", 2025);
  about 0.047 bytes per parameter at its default density of 0.02. Meant for use with
  ``ErrorFeedback``.
- ``sign1``: one sign bit per element and one float32 scale (the mean ``|x|``) per block of
  256, as in Karimireddy et al., "Error Feedback Fixes SignSGD" (2019): about 0.141 bytes per
  parameter, dense. Meant for use with ``ErrorFeedback``.

A sparse codec (``topk``, ``sparse2``) also decodes to a ``SparseTensor`` (``decode_sparse``:
flat indices and float32 values), which the merge adds into its sum without a dense copy.

``ErrorFeedback`` keeps what a lossy codec dropped and adds it to the next tensor sent under the
same name (Seide et al., "1-bit SGD", 2014; Karimireddy et al., "Error Feedback Fixes SignSGD",
2019): ``c_t = x_t + e_t``, ``send Q(c_t)``, ``e_{t+1} = c_t - Q(c_t)``. Summed over rounds,
what was sent plus the final residual equals what was put in.

Wire byte order is little-endian. Only numpy is imported here (no torch), so a cold process that
merges updates starts fast; torch tensors are accepted by duck typing. Codecs are stateless and
safe to share between threads; an ``ErrorFeedback`` belongs to one thread.

Modules: ``base`` (``Codec``, the registry, input checks), ``cast``, ``blockwise``, ``topk``,
``sparse``, ``sign``, ``feedback``. Importing this package registers every codec in ``REQUIRED_CODECS``.
"""

from comms.codecs.base import (
    CODECS,
    REQUIRED_CODECS,
    SPARSE_CODECS,
    Codec,
    SparseTensor,
    as_float_array,
    codec_from_spec,
    get_codec,
    register_codec,
)
from comms.codecs.blockwise import FLUSH_BELOW, Int4Codec, Int8Codec
from comms.codecs.cast import Bf16Codec, Fp16Codec, NoneCodec
from comms.codecs.feedback import ErrorFeedback
from comms.codecs.sign import Sign1Codec
from comms.codecs.sparse import Sparse2Codec
from comms.codecs.topk import TopKCodec, top_k_indices

__all__ = [
    "CODECS",
    "FLUSH_BELOW",
    "REQUIRED_CODECS",
    "SPARSE_CODECS",
    "Bf16Codec",
    "Codec",
    "ErrorFeedback",
    "Fp16Codec",
    "Int4Codec",
    "Int8Codec",
    "NoneCodec",
    "Sign1Codec",
    "Sparse2Codec",
    "SparseTensor",
    "TopKCodec",
    "as_float_array",
    "codec_from_spec",
    "get_codec",
    "register_codec",
    "top_k_indices",
]

_missing = [name for name in REQUIRED_CODECS if name not in CODECS]
if _missing:  # pragma: no cover - guards against a codec class losing its registration
    raise ImportError(f"comms.codecs: required codecs not registered: {_missing}")
