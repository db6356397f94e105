"""newsletter: a self-hosted publisher of email digests."""

__version__ = "0.1.0"
