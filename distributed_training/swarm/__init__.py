"""Everything that speaks hivemind: the DHT and its signed records, progress, the all-reduce.

Only this package imports hivemind, and only `hivemind_private` touches hivemind's private
surface (overridden private methods, private attributes, patches), behind a version check.
"""


class HivemindVersionError(RuntimeError):
    """The installed hivemind is not the release `hivemind_private` was written against."""
