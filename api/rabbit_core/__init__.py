"""rabbit_core package."""
