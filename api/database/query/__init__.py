"""All SQL lives here, one module per aggregate; query code flushes, never commits."""
