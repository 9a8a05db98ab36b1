"""Azure Functions entry points (v2 programming model).

Triggers are thin: read the input, call the rotation engine, map the outcome.
Secret rotation lives in shared/engine.py, key rotation in shared/keys.py.
The worker imports this module at start-up to index the functions, so only azure.functions
and light modules load here; the Azure SDK clients (shared.api, shared.service) are imported
inside the triggers, on first invocation.
"""

import json
import logging
from typing import TYPE_CHECKING

import azure.functions as func

from shared.errors import InvalidEvent
from shared.events import VaultEvent, parse_function_event, parse_payload
from shared.sdk_logging import quiet_sdk_loggers

if TYPE_CHECKING:
    from shared import api

# The worker sends the host every log record whatever its logger, so host.json cannot quiet the SDK.
quiet_sdk_loggers()

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
logger = logging.getLogger("function_app")

SWEEP_SCHEDULE = "0 */5 * * * *"
EVENTS_QUEUE = "keyvault-events"


class RetryableFailure(Exception):
    """Raised so the host reports a failure and Event Grid delivers the event again."""


@app.function_name("keyvault_events")
@app.event_grid_trigger(arg_name="event")
def keyvault_events(event: func.EventGridEvent) -> None:
    """Key Vault Secret/Key NearExpiry and Expired, in the Event Grid or CloudEvents schema."""
    try:
        parsed = [parse_function_event(event)]
    except InvalidEvent as error:
        # Returning normally acknowledges the event: a malformed one must not be retried for 24 h.
        logger.error("dropped Key Vault event %s: %s", str(getattr(event, "id", ""))[:64], error)
        return
    _rotate_for(parsed)


@app.function_name("keyvault_events_queue")
@app.queue_trigger(arg_name="message", queue_name=EVENTS_QUEUE, connection="AzureWebJobsStorage")
def keyvault_events_queue(message: func.QueueMessage) -> None:
    """The same events routed through a Storage queue (Event Grid cannot reach a private endpoint)."""
    try:
        parsed = parse_payload(message.get_body())
    except InvalidEvent as error:
        # Consumed, not retried: a malformed message would only end in the poison queue.
        logger.error("dropped Key Vault event from queue message %s: %s", str(message.id)[:64], error)
        return
    _rotate_for(parsed)


def _rotate_for(events: list[VaultEvent]) -> None:
    """The one handler behind both event triggers: key events to the key service, certificate events to
    certificate renewal, secrets to the engine."""
    from shared import service

    failures: list[str] = []
    certificate_events = [event for event in events if event.is_certificate]
    if certificate_events:
        from shared.certificates import renewal

        certificate_outcomes = map(renewal().handle_event, certificate_events)
        failures += [
            f"certificate {o.secret}: {o.status}: {o.message}" for o in certificate_outcomes if o.retryable
        ]
    key_events = [event for event in events if event.is_key]
    if key_events:
        keys = service.keys()
        key_outcomes = map(keys.handle_event, key_events)
        failures += [f"key {o.key}: {o.status}: {o.message}" for o in key_outcomes if o.retryable]
    secret_events = [event for event in events if not event.is_key and not event.is_certificate]
    if secret_events:
        engine = service.engine()
        secret_outcomes = map(engine.handle_event, secret_events)
        failures += [f"{o.secret}: {o.status}: {o.message}" for o in secret_outcomes if o.retryable]
    if failures:
        raise RetryableFailure("; ".join(failures))


@app.function_name("rotation_sweeper")
@app.timer_trigger(schedule=SWEEP_SCHEDULE, arg_name="timer", run_on_startup=False)
def rotation_sweeper(timer: func.TimerRequest) -> None:
    """Retire due overlaps, resume stalled rotations, catch secrets whose event never came."""
    from shared import service

    outcomes = service.engine().sweep()
    logger.info("sweep done: %d action(s)%s", len(outcomes), " (past due)" if timer.past_due else "")
    from shared.certificates import renewal

    try:
        renewed = renewal().sweep()
    except Exception:  # the certificates' sweep must not fail the secrets' timer run
        logger.exception("certificate sweep failed")
        return
    logger.info("certificate sweep done: %d action(s)", len(renewed))


def _respond(result: "api.ApiResult") -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps(result.body, default=str),
        status_code=result.status,
        mimetype="application/json",
        headers={"Cache-Control": "no-store"},
    )


@app.function_name("rotate_secret")
@app.route(route="secrets/{name}/rotate", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
def rotate_secret(req: func.HttpRequest) -> func.HttpResponse:
    """Rotate now: routine, emergency (overlap 0) or dry run."""
    from shared import api, service

    engine = service.engine()
    caller = api.requested_by(req.headers, engine.settings)
    name = req.route_params.get("name", "")
    return _respond(api.rotate(engine, name, req.params, req.get_body(), caller))


@app.function_name("adopt_secret")
@app.route(route="secrets/{name}/adopt", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
def adopt_secret(req: func.HttpRequest) -> func.HttpResponse:
    """Put an existing secret under rotation without rotating it."""
    from shared import api, service

    engine = service.engine()
    caller = api.requested_by(req.headers, engine.settings)
    name = req.route_params.get("name", "")
    return _respond(api.adopt(engine, name, req.params, req.get_body(), caller))


@app.function_name("bind_secret")
@app.route(route="secrets/{name}/bind", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
def bind_secret(req: func.HttpRequest) -> func.HttpResponse:
    """Pin the secret's current tags as its upstream identity (after a deliberate tag change)."""
    from shared import api, service

    engine = service.engine()
    caller = api.requested_by(req.headers, engine.settings)
    name = req.route_params.get("name", "")
    return _respond(api.bind(engine, name, req.params, req.get_body(), caller))


@app.function_name("secret_rotation_status")
@app.route(route="secrets/{name}/rotation", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def secret_rotation_status(req: func.HttpRequest) -> func.HttpResponse:
    """State, versions, slot, expiry and recent history of one secret."""
    from shared import api, service

    return _respond(api.status(service.engine(), req.route_params.get("name", ""), req.params))


@app.function_name("list_rotations")
@app.route(route="rotations", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def list_rotations(req: func.HttpRequest) -> func.HttpResponse:
    """Every managed secret with state, expiry and last outcome; filters and paging."""
    from shared import api, service

    return _respond(api.list_rotations(service.engine(), req.params))


@app.function_name("entra_expiring")
@app.route(route="entra/expiring", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def entra_expiring(req: func.HttpRequest) -> func.HttpResponse:
    """Client secrets of applications the app's identity owns that expire soon, not under rotation."""
    from shared import api, service

    return _respond(api.entra_expiring(service.engine(), req.params))


@app.function_name("set_key_rotation_policy")
@app.route(route="keys/{name}/rotation-policy", methods=["PUT"], auth_level=func.AuthLevel.FUNCTION)
def set_key_rotation_policy(req: func.HttpRequest) -> func.HttpResponse:
    """Set a Key Vault key's rotation policy (Key Vault then rotates and notifies by itself)."""
    from shared import api, service

    keys = service.keys()
    caller = api.requested_by(req.headers, keys.settings)
    name = req.route_params.get("name", "")
    return _respond(api.set_key_rotation_policy(keys, name, req.params, req.get_body(), caller))


@app.function_name("vault_posture")
@app.route(route="posture", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def vault_posture(req: func.HttpRequest) -> func.HttpResponse:
    """Each served vault's hardening checklist (pass, fail, unknown per row), or one with ?vault=."""
    from shared import api, service

    return _respond(api.vault_posture(service.engine(), req.params))


@app.function_name("renew_certificate")
@app.route(route="certificates/{name}/renew", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
def renew_certificate(req: func.HttpRequest) -> func.HttpResponse:
    """Renew an opted-in Key Vault certificate from its ACME CA now."""
    from shared import api
    from shared.certificates import renewal

    service = renewal()
    caller = api.requested_by(req.headers, service.rt.settings)
    name = req.route_params.get("name", "")
    return _respond(api.renew_certificate(service, name, req.params, req.get_body(), caller))


@app.function_name("bind_certificate")
@app.route(route="certificates/{name}/bind", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
def bind_certificate(req: func.HttpRequest) -> func.HttpResponse:
    """Pin a certificate's ACME directory, DNS zone and names (an operator's act)."""
    from shared import api
    from shared.certificates import renewal

    service = renewal()
    caller = api.requested_by(req.headers, service.rt.settings)
    name = req.route_params.get("name", "")
    return _respond(api.bind_certificate(service, name, req.params, req.get_body(), caller))


@app.function_name("certificate_renewal_status")
@app.route(route="certificates/{name}/renewal", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def certificate_renewal_status(req: func.HttpRequest) -> func.HttpResponse:
    """Current version, expiry, renewal state and history of one certificate."""
    from shared import api
    from shared.certificates import renewal

    return _respond(api.certificate_status(renewal(), req.route_params.get("name", ""), req.params))


@app.function_name("list_certificates")
@app.route(route="certificates", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def list_certificates(req: func.HttpRequest) -> func.HttpResponse:
    """Every opted-in certificate with expiry and renewal state."""
    from shared import api
    from shared.certificates import renewal

    return _respond(api.list_certificates(renewal(), req.params))
