"""HTTP routes of the quality service (thin: they parse, call ``service``, shape the answer).
Annotations are evaluated here (no ``from __future__``): the batch limit comes from settings."""

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Request
from pydantic import ValidationError

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
from c4c.shared.problems import BodyTooLarge, ProblemError, validation_errors

PREFIX = "/quality/v1"
Project = Annotated[str, Path(min_length=1, max_length=200)]
ObservationId = Annotated[str, Path(min_length=1, max_length=64)]


class TooManyItems(BodyTooLarge):
    code, title = "batch-too-large", "Too many items in one batch"


def _service(request: Request, session: SessionDep) -> QualityService:
    parts: Parts = request.app.state.parts
    return parts.service(session)


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
        out, _, _ = await _service(request, session).assess(observation)
        return out

    @router.post(
        "/assessments:batch",
        response_model=BatchOut,
        summary="Score many observations now: one outcome per item",
    )
    async def assess_batch(
        items: Annotated[list[dict[str, Any]], Body(max_length=settings.batch_max_items)],
        request: Request,
        session: SessionDep,
    ) -> dict[str, Any]:
        service = _service(request, session)
        outcomes = []
        for index, item in enumerate(items):
            try:
                out, _, _ = await service.assess(ObservationIn.model_validate(item))
            except ValidationError as exc:
                problem = {
                    "type": "urn:c4c:problem:validation-error",
                    "status": 422,
                    "errors": validation_errors(exc.errors()),
                }
                outcomes.append({"index": index, "status": "error", "problem": problem})
            except ProblemError as exc:
                problem = {"status": exc.status, "title": exc.title, "detail": exc.detail}
                outcomes.append({"index": index, "status": "error", "problem": problem})
            else:
                outcomes.append({"index": index, "status": "assessed", "assessment": out})
        return {"items": outcomes}

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
