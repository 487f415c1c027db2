"""`agd bench`: agd next to real CFG (speed, memory, agreement, quality, negatives)."""
