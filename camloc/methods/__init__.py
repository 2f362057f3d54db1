"""The built-in methods, one module per family, written only against the author surface a plug-in has
(`docs/methods.md`: `register_method`, `method_option`, `CamContext`); the engine lives in `camloc.cams`.
Every module here is imported when the registry is first read (`camloc.cams.registry`)."""
