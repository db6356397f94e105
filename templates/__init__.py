"""Our Jinja templates, installed as a package so wheels carry them."""
