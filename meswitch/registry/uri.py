"""The one parser of storage URIs: ``s3://bucket/prefix``, ``file:///path`` and plain local paths.

The artifact root, a model version's ``source``, the pipeline's inbox and MLflow's run folder all name a
place this way; every module asks this module which kind a URI is and what its parts are, so that a new
form is added here once. Standard library only: the CLI and the flows' light modules import it freely.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from meswitch.registry.errors import RegistryError


@dataclass(frozen=True)
class Location:
    """A parsed URI: an S3 bucket and a key prefix without outer slashes, or a local path (``bucket`` None)."""

    bucket: str | None
    key: str

    @property
    def is_s3(self) -> bool:
        return self.bucket is not None

    @property
    def path(self) -> Path:
        """The local path, as written (``~`` and relative parts are the caller's to resolve)."""
        if self.bucket is not None:
            raise RegistryError(f"{self}: not a local file location")
        return Path(self.key)

    def join(self, *parts: str) -> Location:
        """The location of ``parts`` (``a/b`` or ``a``, ``b``) below this one."""
        if self.bucket is None:
            return Location(None, str(Path(self.key, *parts)))
        key = "/".join(p for p in (self.key, *(part.strip("/") for part in parts)) if p)
        return Location(self.bucket, key)

    def __str__(self) -> str:
        """``s3://bucket/prefix`` without a trailing slash, or the local path."""
        if self.bucket is None:
            return self.key
        return f"s3://{self.bucket}/{self.key}".rstrip("/")


def _scheme(text: str) -> str:
    return text.split("://", 1)[0].lower() if "://" in text else ""


def is_s3(uri: str | Path) -> bool:
    """True for ``s3://...``; anything else is taken for a local folder (or refused by ``parse_location``)."""
    return _scheme(str(uri)) == "s3"


def parse_location(uri: str | Path | Location) -> Location:
    """Parse ``s3://bucket[/prefix]``, ``file:///path`` or a plain path; refuse every other scheme."""
    if isinstance(uri, Location):
        return uri
    text = str(uri)
    scheme = _scheme(text)
    if not scheme:
        return Location(None, text)
    parsed = urllib.parse.urlparse(text)
    if scheme == "s3":
        if not parsed.netloc:
            raise RegistryError(f"{text}: expected s3://bucket[/prefix]")
        return Location(parsed.netloc, parsed.path.strip("/"))
    if scheme == "file":
        return Location(None, urllib.parse.unquote(parsed.path))
    raise RegistryError(f"{text}: only s3://bucket/prefix and local folders (a path or file://) are supported")
