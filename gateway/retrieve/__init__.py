"""Cohort retrieval: requests, archive limits, the retriever."""
