"""What a run is asked to do: shared vocabulary, presets, checks of user values, prompt sets, run folders."""
