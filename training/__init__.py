"""Command-line training package for DRM: `python -m training <command>` (see `--help`)."""
