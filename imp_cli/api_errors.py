"""An OpenAI-style error reply and the checks of a request's plain fields that raise one: what
`imp serve` and its field handlers (openai_fields.py) share, in a module of its own so that
neither imports the other back."""

from __future__ import annotations

import math


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code=code, param=param)


def _number(body: dict, name: str, lo: float, hi: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise _bad(f"'{name}' must be {'an integer' if integer else 'a number'}", name, "invalid_type")
    if not (lo <= value <= hi) or (not integer and not math.isfinite(value)):
        raise _bad(f"'{name}' must be between {lo:g} and {hi:g}", name)
    return value


def _flag(body: dict, name: str, where: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(f"'{where or name}' must be true or false", where or name, "invalid_type")
    return value
