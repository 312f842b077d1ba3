"""The organisation's server: Starlette on uvicorn, mutual TLS, stateless (every replica
against one store). ``app.build_app(ctx)`` collects the routes of ``app.ROUTE_MODULES``;
``run.serve`` runs it; ``auth.py`` says which workstation is asking; ``tlsext.py`` hands
the client certificate to the app."""
