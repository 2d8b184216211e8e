"""The one error type users see from drm_core: it always names the input and what was expected."""


class DRMError(ValueError):
    """Bad input to drm_core (file, tensor or argument); the message names it and the expectation."""
