"""`make bench`: read `scenarios.py` first (what is measured, against what, the targets).

runner.py runs the rounds, report.py prints and saves them, soak.py is `SOAK=600`;
reference_app.py is the bare reference, serve.py the hook in the processes under test
(loop lag, GC), wrk/*.lua the loads; the rest is set-up (environment, servers, seed,
pgbouncer, otlp_sink) and checks.
"""
