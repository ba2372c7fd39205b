"""`make bench`: wrk against the service and a bare reference app, side by side in one run."""
