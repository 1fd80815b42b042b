"""The daemon's routes, one module per concern, each added by one function.

::

    sessions   /v1/sessions...                 sessions: create, list, execute, files, attach…
    files      /v1/files...                    the file store
    agents     /v1/agents/{id}/files           files an agent's sessions see
    runs       /v1/run, /v1/runs               one-shot runs (batch path)
    fusion     /run_code, /run_jupyter,        SandboxFusion's API
               /v1/ping
    reporting  /v1/stats, /v1/health           figures and liveness

Each ``add_*_routes(app, engine, ...)`` takes the engine as the contract
(:class:`~sandkernel.api.EngineAPI`, or :class:`~sandkernel.api.ServedEngine`
where it needs the policy or a stored file's stream). What the routes may
raise, and so document, is in :mod:`~sandkernel.daemon.routes.raises`.
"""
