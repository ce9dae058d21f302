"""Strategy runs: one client request's run (run.py); the context a strategy works through (context.py) over the
run's shared state and its scope (state.py); the budgeted call every engine call or pooled sample goes through
(budgeted.py) with the budget scopes it charges (accounting.py); non-streamed calls, n-splitting and seeds
(calls.py); the streamed call and its translation into StreamEvents (streams.py); call bodies and reply parsing
(sampling.py); the HTTP verifier client (verifier.py); and the checks made before a run starts (validation.py)."""
