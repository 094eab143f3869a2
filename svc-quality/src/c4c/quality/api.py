"""HTTP routes of the quality service (thin: they parse, call ``service``, shape the answer).
Annotations are evaluated here (no ``from __future__``): the batch limit comes from settings."""

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Request, Response
from pydantic import ValidationError
from pydantic_core import to_json

from c4c.quality.schemas import (
    AssessmentHistory,
    AssessmentOut,
    BatchOut,
    ObservationIn,
    RuleSetIn,
    RuleSetOut,
)
from c4c.quality.service import QualityService
from c4c.quality.settings import QualitySettings
from c4c.quality.wiring import Parts
from c4c.shared.db import SessionDep
from c4c.shared.problems import BodyTooLarge, validation_errors

PREFIX = "/quality/v1"
Project = Annotated[str, Path(min_length=1, max_length=200)]
ObservationId = Annotated[str, Path(min_length=1, max_length=64)]


class TooManyItems(BodyTooLarge):
    code, title = "batch-too-large", "Too many items in one batch"


def _service(request: Request, session: SessionDep) -> QualityService:
    parts: Parts = request.app.state.parts
    return parts.service(session)


def _json(content: dict[str, Any]) -> Response:
    """An answer the service built in its documented shape, serialised as is: validating
    it again against the response model cost as much as scoring a batch. Non-finite numbers
    (echoed from the input as evidence) become null, as the model's serialiser does."""
    return Response(to_json(content, inf_nan_mode="null"), media_type="application/json")


def build_router(settings: QualitySettings) -> APIRouter:
    router = APIRouter(prefix=PREFIX, tags=["quality"])

    @router.post(
        "/assessments",
        response_model=AssessmentOut,
        summary="Score an observation now (nothing is stored)",
    )
    async def assess(
        observation: ObservationIn, request: Request, session: SessionDep
    ) -> dict[str, Any]:
        return await _service(request, session).assess(observation)

    @router.post(
        "/assessments:batch",
        response_model=BatchOut,
        summary="Score many observations now: one outcome per item",
    )
    async def assess_batch(
        items: Annotated[list[dict[str, Any]], Body(max_length=settings.batch_max_items)],
        request: Request,
        session: SessionDep,
    ) -> Response:
        outcomes: list[dict[str, Any] | None] = [None] * len(items)
        valid: list[tuple[int, ObservationIn]] = []
        for index, item in enumerate(items):
            try:
                valid.append((index, ObservationIn.model_validate(item)))
            except ValidationError as exc:
                problem = {
                    "type": "urn:c4c:problem:validation-error",
                    "status": 422,
                    "errors": validation_errors(exc.errors()),
                }
                outcomes[index] = {"index": index, "status": "error", "problem": problem}
        # The valid ones together: what the suite knows around them is read once per batch.
        assessed = await _service(request, session).assess_many([data for _, data in valid])
        for (index, _), (out, _, _) in zip(valid, assessed, strict=True):
            outcomes[index] = {"index": index, "status": "assessed", "assessment": out}
        return _json({"items": outcomes})

    @router.get(
        "/assessments/{observation_id}",
        response_model=AssessmentHistory,
        summary="The latest assessment of an observation, with its history",
    )
    async def history(
        observation_id: ObservationId, request: Request, session: SessionDep
    ) -> dict[str, Any]:
        return await _service(request, session).history(observation_id)

    @router.get("/rulesets/{project}", response_model=RuleSetOut, summary="A project's rule set")
    async def get_ruleset(
        project: Project, request: Request, session: SessionDep
    ) -> dict[str, Any]:
        return await _service(request, session).ruleset(project)

    @router.put(
        "/rulesets/{project}",
        response_model=RuleSetOut,
        summary="Replace a project's rule set (a new version; assessments name theirs)",
    )
    async def put_ruleset(
        project: Project, body: RuleSetIn, request: Request, session: SessionDep
    ) -> dict[str, Any]:
        return await _service(request, session).put_ruleset(project, body)

    return router
