"""Project-wide foundations: typed params, presets, paths, errors, redaction, numbers, atomic I/O
and the stage runner. Imports no other lmforge package."""
