"""canary-proxy: canary releases without a service mesh."""

__version__ = "0.1.0"
