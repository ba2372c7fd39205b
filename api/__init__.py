"""orders-api: place and track orders; every change is an event on RabbitMQ."""
