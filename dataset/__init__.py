"""Dataset configuration, media sources, buckets and cache files (arrive with the caching issue)."""
