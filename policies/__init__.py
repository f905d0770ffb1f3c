"""The bundled policy library: data, not code. A package only so that wheels carry it and
`classification.library` finds it with importlib.resources."""
