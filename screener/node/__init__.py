"""The DICOM node: transport and durable storage around the pipeline."""
