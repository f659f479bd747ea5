"""Data: conversation rendering and label masking (``preprocess``), datasets, image loading."""
