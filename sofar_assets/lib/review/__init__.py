"""People in the loop: the review queue, corrections, real-world accuracy, drift, day health."""
