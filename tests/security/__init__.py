"""OWASP API Security Top 10 (2023): one module per risk, each test named after it."""
