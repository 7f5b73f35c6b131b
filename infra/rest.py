"""HTTPS requests the program makes itself (the registry's token exchange, ARM calls azure-native has no invoke for:
name-availability checks, role assignments of a principal), retried with backoff on network errors and on Azure's
"try again" answers (429, 5xx); any other HTTP error is final."""

import json
import time
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

TIMEOUT_S = 60
RETRY_DELAYS_S = (2.0, 4.0, 8.0)  # then give up: four attempts within about 15 s plus the timeouts
_RETRIED_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class RequestFailed(Exception):
    """The request failed for good (after retries where retrying made sense)."""


def post(url: str, body: bytes, headers: dict[str, str]) -> Any:
    """POST `body` and return the JSON answer."""
    return _send(Request(url, data=body, headers=headers, method="POST"))


def get(url: str, headers: dict[str, str]) -> Any:
    """GET the JSON answer."""
    return _send(Request(url, headers=headers, method="GET"))


def _send(request: Request) -> Any:
    for delay in (*RETRY_DELAYS_S, None):
        try:
            with urlopen(request, timeout=TIMEOUT_S) as response:
                return json.load(response)
        except HTTPError as error:
            if error.code not in _RETRIED_STATUSES or delay is None:
                raise RequestFailed(str(error)) from None
        except (URLError, TimeoutError, ConnectionError) as error:  # DNS, refused, reset, timed out
            if delay is None:
                raise RequestFailed(str(error)) from None
        except ValueError as error:  # not JSON
            raise RequestFailed(f"the answer is not JSON ({error})") from None
        time.sleep(delay)
    raise AssertionError("unreachable: the last attempt returns or raises")
