"""redis_core package."""
