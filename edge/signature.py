"""Twilio request validation (X-Twilio-Signature: HMAC-SHA1 over the URL and sorted POST parameters).

The webhook (/twiml) is signed over its public URL, query string included, plus
its form parameters. Media Streams sign the WebSocket upgrade the same way,
over the <Stream url> exactly as our TwiML gave it (wss://.../media, no query:
Twilio does not allow one) with no parameters. Both URLs come from
PUBLIC_URL (`edge.settings`), never from the request's Host header.
When TWILIO_AUTH_TOKEN is unset (local development), nothing is validated.
"""

from __future__ import annotations

from collections.abc import Mapping

from twilio.request_validator import RequestValidator

from edge.settings import Settings, media_url, signatures_required

SIGNATURE_HEADER = "X-Twilio-Signature"


def _validator(settings: Settings) -> RequestValidator:
    return RequestValidator(settings.twilio_auth_token.get_secret_value())


def validate_webhook(settings: Settings, url: str, form_params: Mapping[str, str], signature: str | None) -> bool:
    """True when the webhook's signature matches `url` (its public URL) and its form parameters.

    `form_params` may be a multidict (aiohttp's `await request.post()`): repeated keys are all signed.
    """
    if not signatures_required(settings):
        return True
    return bool(signature) and _validator(settings).validate(url, form_params, signature)


def validate_websocket(settings: Settings, signature: str | None) -> bool:
    """True when the WebSocket upgrade's signature matches our <Stream url> (media_url) with no parameters."""
    if not signatures_required(settings):
        return True
    return bool(signature) and _validator(settings).validate(media_url(settings), {}, signature)


def sign(auth_token: str, url: str, params: Mapping[str, str] | None = None) -> str:
    """The X-Twilio-Signature Twilio would send for `url` and POST `params` (the simulator and tests use it)."""
    return RequestValidator(auth_token).compute_signature(url, params or {})


def sign_websocket(auth_token: str, stream_url: str) -> str:
    """The X-Twilio-Signature of a Media Streams WebSocket upgrade to `stream_url`."""
    return sign(auth_token, stream_url)
