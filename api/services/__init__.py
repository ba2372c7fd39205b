"""Domain operations shared by the HTTP routers and the queue consumers."""
