"""Configuration, torch-free: the settings schema, validation, names, seeds, errors and the command-line glue."""
