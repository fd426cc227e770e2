"""Data: sources -> ray.data.Dataset, the decode/crop/mask stream, and mask sampling."""
