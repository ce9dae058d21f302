"""ttc-proxy: an OpenAI-compatible proxy that spends test-time compute on better answers."""

__version__ = "0.1.0"
