"""The one exception type qcache raises for user-facing problems (bad recipe, missing file, impossible setting).

Command-line entry points turn it into a one-line ``error: ...`` message and exit code 2.
"""


class QcacheError(Exception):
    """A problem the user can fix; its message is one line naming the field or file at fault."""
