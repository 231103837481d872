"""Wire protocol shared by miners and validators.

Every endpoint is a signed ``POST`` carrying a JSON body, so one signing and
verification path (``bittensor.http_auth``) covers all of them — even the
argument-less liveness probe sends ``{}``. Models forbid unknown fields: a
peer speaking a different protocol revision fails loudly with a 422 instead of
having its extra fields silently dropped.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat

from distributed_training import PROTOCOL_VERSION

__all__ = [
    "IS_ALIVE_PATH",
    "MAX_BODY_BYTES",
    "MAX_PAGES",
    "PROTOCOL_VERSION",
    "WORK_PATH",
    "IsAliveRequest",
    "IsAliveResponse",
    "WorkRequest",
    "WorkResponse",
    "response_mismatch",
]

IS_ALIVE_PATH = "/is_alive"
WORK_PATH = "/work"

# Requests and responses are tiny; anything bigger is abuse, not traffic.
MAX_BODY_BYTES = 64 * 1024
# Upper bound on pages per work request, keeping one request's work bounded.
MAX_PAGES = 64

NonNegativeInt = Annotated[int, Field(ge=0)]


class _WireModel(BaseModel):
    """Base for all wire models: unknown fields are an error, not ignored."""

    model_config = ConfigDict(extra="forbid")


class IsAliveRequest(_WireModel):
    """Empty body of the liveness probe (sent as ``{}`` so it can be signed like any other)."""


class IsAliveResponse(_WireModel):
    """A miner's self-description, used by validators to pick who to query."""

    version: str  # package version of the miner software
    protocol: int  # wire protocol revision (distributed_training.PROTOCOL_VERSION)
    hotkey: str  # the miner's own hotkey, lets the validator spot misrouted axons
    peer_id: str  # hivemind peer id the miner trains under
    epoch: int  # the miner's current training epoch
    uid: int | None  # the miner's uid on the subnet, if it knows it


class WorkRequest(_WireModel):
    """Ask a miner for its loss on specific data pages, to verify it trains what it claims."""

    run_id: str = Field(min_length=1)
    round: NonNegativeInt
    pages: list[NonNegativeInt] = Field(min_length=1, max_length=MAX_PAGES)
    epoch_hint: int | None = None  # the newest epoch whose model the validator holds: answer from it if held


class WorkResponse(_WireModel):
    """A miner's answer to a :class:`WorkRequest`."""

    run_id: str
    round: int
    epoch: int
    peer_id: str
    # One loss per requested page, in request order; NaN/inf cannot be scored.
    losses: list[FiniteFloat]
    # Cumulative samples this miner has contributed to the swarm.
    samples_trained: NonNegativeInt


def response_mismatch(request: WorkRequest, response: WorkResponse) -> str | None:
    """Why ``response`` does not answer ``request``, or ``None`` if it does.

    The transport only checks that a response is well-formed; whether it
    belongs to the question asked is the validator's call, made here so
    miner and validator agree on what "matching" means.
    """
    if response.run_id != request.run_id:
        return f"run_id {response.run_id!r} != requested {request.run_id!r}"
    if response.round != request.round:
        return f"round {response.round} != requested {request.round}"
    if len(response.losses) != len(request.pages):
        return f"{len(response.losses)} losses for {len(request.pages)} pages"
    return None
