"""Stage runners: each builds its objects from the config, runs the loop, logs and checkpoints."""
