"""The DICOM Upper Layer on asyncio: PDU framing, the PS3.8 state machine, associations."""
