"""Inbound RabbitMQ consumers: messages other services send us (outbound lives in rabbit_core)."""
