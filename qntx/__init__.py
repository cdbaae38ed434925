"""QNTX: a ZeroMQ actor bus with an attestation store and a durable job scheduler."""
