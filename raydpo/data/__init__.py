"""Preference data: formats and validation, tokenization, collation, the
Parquet preference store. Importing this package does not import Ray; the
Ray Data glue is `raydpo.data.pipeline`."""
