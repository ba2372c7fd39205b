"""The HTTP edge: dependencies that read the request (caller, limits, cached reads).

The layers below (`redis_core`, `services`, `database`) take plain values.
"""
