"""Data in: task datasets -> the SOFAR dataset, the one decode path, uploads, the day's manifest, the store."""
