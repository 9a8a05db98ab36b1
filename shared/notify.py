"""Tell people when a rotation needs their attention: rolled back, failed, or an emergency.

Two channels, either or both, from app settings: a webhook (`ROTATION_NOTIFY_WEBHOOK`,
a JSON POST) and an Event Grid custom topic (`ROTATION_NOTIFY_EVENTGRID_ENDPOINT`,
published with the app's managed identity). A notification never carries a secret
value, and a failing channel is logged, never allowed to fail the rotation.
"""

import json
import logging
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from azure.core.credentials import TokenCredential

from shared.settings import Settings

logger = logging.getLogger(__name__)

Notifier = Callable[[dict[str, Any]], None]
EVENT_TYPE_PREFIX = "SecretRotation."


def _webhook(url: str, ca_bundle: str | None) -> Notifier:
    import ssl  # noqa: PLC0415 - only when a webhook is configured

    context = ssl.create_default_context(cafile=ca_bundle) if ca_bundle else None

    def send(notice: dict[str, Any]) -> None:
        request = urllib.request.Request(  # noqa: S310 - the URL is an app setting, not input
            url, data=json.dumps(notice).encode(), headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=10, context=context) as response:  # noqa: S310
            response.read()

    return send


def _event_grid(endpoint: str, credential: TokenCredential, ca_bundle: str | None) -> Notifier:
    from azure.eventgrid import EventGridEvent, EventGridPublisherClient  # noqa: PLC0415

    # Per request: the publisher client does not hand a constructor's connection_verify to its transport.
    options: dict[str, Any] = {"connection_verify": ca_bundle} if ca_bundle else {}
    client = EventGridPublisherClient(endpoint, credential)

    def send(notice: dict[str, Any]) -> None:
        event_type = EVENT_TYPE_PREFIX + "".join(part.title() for part in notice["status"].split("_"))
        client.send(
            [
                EventGridEvent(
                    subject=f"secrets/{notice['secret']}",
                    event_type=event_type,
                    data=notice,
                    data_version="1.0",
                )
            ],
            **options,
        )

    return send


def build_notifier(settings: Settings, credential: TokenCredential) -> Notifier | None:
    channels: list[tuple[str, Notifier]] = []
    if settings.notify_webhook:
        channels.append(("webhook", _webhook(settings.notify_webhook, settings.upstream_ca_bundle)))
    if settings.notify_eventgrid_endpoint:
        channels.append(
            (
                "event grid",
                _event_grid(settings.notify_eventgrid_endpoint, credential, settings.upstream_ca_bundle),
            )
        )
    if not channels:
        return None

    def notify(notice: dict[str, Any]) -> None:
        notice = {**notice, "time": datetime.now(UTC).isoformat()}
        for name, channel in channels:
            try:
                channel(notice)
            except Exception as error:
                logger.error("notification by %s failed: %s", name, type(error).__name__)

    return notify
