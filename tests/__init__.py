"""The test suite (a package, so `tests.*` imports resolve here even where a dependency ships a `tests` package)."""
