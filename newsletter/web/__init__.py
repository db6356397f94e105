"""The web side served by `newsletter serve`: subscriber pages and the archive."""
