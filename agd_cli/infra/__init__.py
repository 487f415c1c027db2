"""Plumbing every stage uses: errors, files, locks, terminal, runtime settings, images, hardware."""
