"""Files in and out: checkpoints, exports and their format, loaded generators, weights checked against architectures, importers of EDM and official DMD2 networks."""
