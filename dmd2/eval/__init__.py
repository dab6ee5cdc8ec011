"""Measuring generators: feature networks, statistics, references, one measurement, and comparing runs."""
