"""The toy world: the whole DRM mission on a CPU in minutes, against a known ground-truth reward."""
