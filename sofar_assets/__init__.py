"""sofar_assets: the efficiency-centric SOFAR image-recognition system as one Dagster asset graph."""
