"""drift: watches the population posterior of every measure.

The population agent compares each new posterior with its detector's reference
(monitoring.drift.PosteriorShiftDetector: KL divergence of q(θ), shift of the
population effect in posterior-sd units) and records the verdict in the
message. This agent, one owner per partition of the compacted
population-posterior topic, exports those statistics as metrics and turns a
detected drift into an alert on the alerts topic (keyed by measure). Workers
republish every score when a posterior says ``rescore`` (streams.app).
"""

from __future__ import annotations

import logging

import faust
from pydantic import ValidationError

from streams.schemas import Alert, PopulationPosterior
from streams.telemetry import Telemetry
from streams.topics import Topics

log = logging.getLogger(__name__)


def drift_alert(message: PopulationPosterior) -> Alert | None:
    """The alert a posterior calls for, or None. Its event id is a function of
    the posterior version, so a replay republishes the same alert."""
    if not message.drift_detected:
        return None
    effect = message.summary.get("effect")
    where = (
        f" (now {effect.mean:.3g}, 90% {effect.lower:.3g} to {effect.upper:.3g})" if effect else ""
    )
    return Alert(
        event_id=f"drift:{message.measure}:{message.version}",
        event_time=message.event_time,
        kind="drift",
        severity="warning",
        measure=message.measure,
        message=(
            f"population posterior of {message.measure} drifted: effect moved "
            f"{message.drift.get('shift', 0.0):+.2f} posterior sd, "
            f"KL {message.drift.get('kl', 0.0):.2f}{where}"
        ),
        population_version=message.version,
        statistics=dict(message.drift),
    )


def register(app: faust.App, topics: Topics, telemetry: Telemetry) -> None:
    async def drift(stream: faust.StreamT) -> None:
        async for value in stream:
            try:
                message = PopulationPosterior.model_validate_json(value)
            except ValidationError as error:
                log.warning("drift: ignoring an invalid population posterior: %s", error)
                continue
            telemetry.drift(message)
            alert = drift_alert(message)
            if alert is not None:
                log.warning("%s", alert.message)
                await topics.alerts.send(
                    key=message.measure.encode(), value=alert.model_dump_json().encode()
                )

    app.agent(topics.population_posterior, name="drift")(drift)
