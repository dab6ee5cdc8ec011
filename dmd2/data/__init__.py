"""Data sets (CIFAR-10, image folders, EDM datasets, generated ones), their batches and image conversions."""
