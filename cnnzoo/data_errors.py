"""The one exception of the data layer: a dataset that cannot be used as configured.

``run.py`` reports it as one ``error:`` line and exits with code 2, before any framework is
imported or any run file is written. Messages name the problem and the fix."""


class DataError(ValueError):
    """A dataset that cannot be used with the chosen architecture or options."""
