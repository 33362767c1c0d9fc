"""Everything that crosses a wire.

Codecs (``comms.codecs``), the update envelope and chunk framing (``comms.envelope``),
Ed25519 identities, the roster and replay protection (``comms.identity``), signed reads
(``comms.reads``), TLS material (``comms.tls``), the gRPC transport (``comms.transport``),
DHT discovery over hivemind (``comms.discovery``) and link emulation (``comms.shaper``).

``comms`` knows nothing about models, optimizers or training: it moves named numpy arrays
and opaque bytes.
"""

PROTOCOL_VERSION = 3  # 2: chunks carry a CRC-32; 3: SHA-256 digests instead of BLAKE2b
