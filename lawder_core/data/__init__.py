"""Data layer: the HDF5 schema, the Dataset, and the `prepare` converters."""
