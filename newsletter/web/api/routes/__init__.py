"""The API's routes by resource; each `*_routes(app)` function registers one group."""
