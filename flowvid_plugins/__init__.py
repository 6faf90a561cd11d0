"""Optional plugins, registered through entry points (see pyproject.toml)."""
