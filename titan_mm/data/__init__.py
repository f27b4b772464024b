"""Data pipeline: samples -> documents (tokens + image patches) -> packed fixed-shape batches."""
