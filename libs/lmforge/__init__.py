"""lmforge's shared platform package: bus, telemetry, settings, artifacts, runtime, CLI.

Imports without torch; model code that several services share lives in
`lmforge.modeling`, which imports torch lazily.
"""

__version__ = "0.1.0"
