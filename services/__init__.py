"""BentoML HTTP service over `lorasa_serve.Engine` (see services/service.py and README "Serving over HTTP")."""
