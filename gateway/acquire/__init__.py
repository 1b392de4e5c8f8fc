"""Device acquisition: devices, sequences, tasks, the Modality Worklist and MPPS."""
