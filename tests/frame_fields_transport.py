"""The tests' frame transport with per-push BEGIN fields (see frame_transport.FieldsFrameTransport)."""

from frame_transport import FIELDS_TRANSPORT

from weightstream.protocol.transports import register

TRANSPORT = FIELDS_TRANSPORT

register(TRANSPORT.name, __name__)
