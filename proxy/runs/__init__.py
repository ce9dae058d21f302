"""Strategy runs: one client request's run (run.py), the context a strategy works through (context.py) with
its budget and accounting (accounting.py), call bodies and reply parsing (sampling.py), the HTTP verifier
client (verifier.py), and the checks made before a run starts (validation.py)."""
