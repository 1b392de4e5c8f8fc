"""The DICOM node as a service-class provider: listener, association policy, DIMSE handlers."""
