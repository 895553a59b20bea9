"""ragfan's service layer: config, fan-out, fusion, the HTTP gateway, the Python client and the CLI."""

__version__ = "0.1.0"
