"""The domain's exceptions: small, specific, and carrying the facts a user needs."""

from __future__ import annotations


class TwinError(Exception):
    """Base of every error Twin Pipelines raises on purpose."""


class SchemaError(TwinError):
    """A data schema file is malformed or names something that does not exist."""


class SiteDataError(TwinError):
    """A site's data does not match its declared schema."""


class InvalidWeights(TwinError):
    """Weights or an update do not fit the model they claim to belong to."""


class MalformedStream(TwinError):
    """A chunked weight stream is out of order, truncated or fails its checksum."""


class SiteCallError(TwinError):
    """A call to a site failed: unreachable, refused, timed out, or answered with garbage.

    Attributes:
        site_id: the site that was called.
        code: a short machine-readable reason ("UNAVAILABLE", "DEADLINE_EXCEEDED", ...).
    """

    def __init__(self, site_id: str, code: str, message: str) -> None:
        super().__init__(f"site {site_id}: {code}: {message}")
        self.site_id = site_id
        self.code = code
        self.message = message


class NotEnoughSites(TwinError):
    """Fewer sites succeeded than the round's quorum needs."""

    def __init__(self, got: int, needed: int, detail: str = "") -> None:
        msg = f"only {got} site(s) succeeded, the round needs at least {needed}"
        super().__init__(f"{msg}: {detail}" if detail else msg)
        self.got = got
        self.needed = needed
