"""Engines behind the proxy: one Backend per configured engine, what it can do, its scheduler, and the
embedded llama-server the proxy can start itself."""

from .backend import Backend, BackendResponse, new_client_session
from .capabilities import Capabilities

__all__ = ["Backend", "BackendResponse", "Capabilities", "new_client_session"]
