"""`agd collect`: plan -> teacher -> sample -> store (CFG-guided trajectories on disk)."""
