"""The package's own error types: each names a bad input (a file, a field, a tensor) in one line."""


class RecycoreError(ValueError):
    """A bad input the user can fix; the command line prints its message on one line."""


class ArtifactError(RecycoreError):
    """A malformed, corrupted or mismatched artifact; the message names the problem."""


class CheckpointError(RecycoreError):
    """A training checkpoint that is missing, damaged, foreign or does not fit the run."""


class DataError(RecycoreError):
    """Token shards or a validation split that cannot feed training or evaluation."""
