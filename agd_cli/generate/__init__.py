"""`agd generate`: one-pass sampling with trained adapters, and the image files it writes."""
