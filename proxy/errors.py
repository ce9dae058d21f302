"""Named error types, each knowing its HTTP status and OpenAI error shape."""

from __future__ import annotations

from typing import Any

# The status a request gets when its client left before the response ended (nginx's "client closed request").
CLIENT_CLOSED = 499


class ProxyError(Exception):
    """An error the client should see as an OpenAI-style error body."""

    status_code: int = 500
    error_type: str = "server_error"
    code: str | None = None
    # Sent as `x-should-retry`, which the official SDKs obey over their status-code rule (they retry 408, 409,
    # 429 and 5xx twice by default): False for an error that would repeat, so one request costs one run.
    # None: no header, the SDK's rule decides (a full queue, a backend that is down for now).
    should_retry: bool | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status_code: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code
        self.headers = dict(headers or {})
        if self.should_retry is not None:
            self.headers.setdefault("x-should-retry", "true" if self.should_retry else "false")

    def not_to_be_retried(self) -> ProxyError:
        """Mark this error as one a retry would repeat (e.g. it ended a strategy run, which a retry would pay
        for again in full); returns it."""
        self.headers["x-should-retry"] = "false"
        return self

    def to_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


class InvalidRequest(ProxyError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(ProxyError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class RequestTooLarge(ProxyError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class NotFound(ProxyError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class Overloaded(ProxyError):
    """The backend's queue is full; the client should retry later."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "proxy_queue_full"


class BackendError(ProxyError):
    """The backend answered with an error status; we keep its status and message."""

    error_type = "backend_error"
    code = "backend_error"


class BackendUnreachable(ProxyError):
    status_code = 502
    error_type = "backend_error"
    code = "backend_unreachable"


class BackendConnectFailed(BackendUnreachable):
    """No connection to the backend could be made: the request never reached it, so another backend serving the
    same model may take it."""


class BackendDown(ProxyError):
    """Every backend serving the model is marked down (failed health checks or refused connections): nothing is
    sent; `Retry-After` says when the next check may bring one back."""

    status_code = 503
    error_type = "backend_error"
    code = "backend_down"


class BackendInvalidResponse(ProxyError):
    """The backend answered 200 with something that is not an OpenAI response (not JSON, no `choices`)."""

    status_code = 502
    error_type = "backend_error"
    code = "backend_invalid_response"


class BackendTimeout(ProxyError):
    status_code = 504
    error_type = "backend_error"
    code = "backend_timeout"


class BudgetExhausted(ProxyError):
    """A strategy hit its token, call or wall-time budget."""

    status_code = 429
    should_retry = False
    error_type = "budget_exceeded"
    code = "budget_exhausted"


class StrategyFailed(ProxyError):
    """A strategy could not produce an answer (e.g. too few candidates survived)."""

    status_code = 502
    error_type = "strategy_error"
    code = "strategy_failed"
    should_retry = False


class ClientDisconnected(Exception):
    """The client went away; every backend call made for it is cancelled."""


def _detail_text(detail: Any) -> str:
    """FastAPI's `detail`: a string, or validation errors [{"loc": [...], "msg": ...}, ...]."""
    if isinstance(detail, list) and all(isinstance(d, dict) and "msg" in d for d in detail):
        return "; ".join(": ".join(x for x in (".".join(map(str, d.get("loc") or ())), str(d["msg"])) if x)
                         for d in detail)
    return str(detail)


def error_from_backend(status_code: int, payload: Any, text: str = "") -> BackendError:
    """Normalise any backend error body (OpenAI, llama.cpp, FastAPI `detail`, plain text) to OpenAI shape."""
    message: str | None = None
    error_type = None
    param = None
    code = None
    if isinstance(payload, dict):
        err = payload.get("error", payload)
        if isinstance(err, dict):
            message = err.get("message") or (_detail_text(err["detail"]) if err.get("detail") else None)
            error_type = err.get("type")
            param = err.get("param")
            code = err.get("code")
        elif isinstance(err, str):
            message = err
        if message is None and "detail" in payload:
            message = _detail_text(payload["detail"])
        if message is None and isinstance(payload.get("message"), str):
            message = payload["message"]
    if not message:
        message = text.strip() or f"backend answered HTTP {status_code}"
    if status_code == 422:  # FastAPI engines (transformers serve) refuse a request so; the OpenAI API says 400
        status_code = 400
    error = BackendError(
        str(message),
        param=param if isinstance(param, str) else None,
        code=str(code) if code is not None else None,
        status_code=status_code,
    )
    if isinstance(error_type, str) and error_type:
        error.error_type = error_type
    elif 400 <= status_code < 500:
        error.error_type = "invalid_request_error"
    return error
