"""Errors the engine raises and the triggers map to outcomes.

Messages are written for an operator and never contain a secret value.
"""


class RotationError(Exception):
    """Base class of every error the rotation service raises on purpose."""

    code = "rotation_error"


class InvalidEvent(RotationError):
    """An event that is malformed, of an unknown type, or about an unacceptable object."""

    code = "invalid_event"


class ConfigError(RotationError):
    """A secret's rotation tags or the app settings are missing or invalid."""

    code = "invalid_configuration"


class NotManaged(RotationError):
    """The secret carries no rotation tags: it is not under rotation."""

    code = "not_managed"


class TargetNotAllowed(ConfigError):
    """A tag points at an upstream host that is not on the app's allow-list."""

    code = "target_not_allowed"


class UpstreamError(RotationError):
    """The upstream system refused or failed an operation on a credential."""

    code = "upstream_error"


class VerificationFailed(UpstreamError):
    """A newly created credential did not authenticate upstream."""

    code = "verification_failed"


class UnsafeOperation(RotationError):
    """The engine refused an operation that would break a live credential."""

    code = "unsafe_operation"


class InvalidInput(ConfigError):
    """Input from outside that is not well-formed: a body, token, event or tag value.

    A ConfigError, so a tag parser that lets one through still reports a misconfiguration.
    """

    code = "invalid_input"


class Refused(RotationError):
    """The secret asks for something whoever wrote it could not do themselves (another team's
    slot, an admin credential that does not serve it, tags that disagree with its binding).
    Nothing was changed; an operator must act."""

    code = "refused"


class PossessionNotProven(Refused):
    """The secret's current value does not authenticate upstream as its current slot."""

    code = "possession_not_proven"
