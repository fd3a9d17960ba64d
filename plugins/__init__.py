"""xbench's built-in plugins. Each module is registered through the ``xbench`` entry-point
group in pyproject.toml, exactly as a third-party plugin would be."""
