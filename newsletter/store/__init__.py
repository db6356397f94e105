"""The store: tables, migrations, and the interface the delivery code depends on."""
