"""Outbound DICOM: the gateway as a service-class user (echo now; sending and retrieval later)."""
