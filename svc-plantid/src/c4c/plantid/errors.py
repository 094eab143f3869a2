"""The plantid service's problem types."""

from c4c.shared.problems import BadRequest, NotFound, ProblemError


class QuotaExceeded(ProblemError):
    status, code, title = 429, "quota-exceeded", "Daily identification quota exceeded"


class ProjectNotFound(NotFound):
    code, title = "project-not-found", "No such project"


class ReferenceNotFound(NotFound):
    code, title = "reference-not-found", "No such reference"


class ImportNotFound(NotFound):
    code, title = "import-not-found", "No such import"


class SpeciesNotFound(NotFound):
    code, title = "species-not-found", "Species not found"


class InvalidQuery(BadRequest):
    code, title = "invalid-identification-query", "Bad Request"


class ProjectExists(ProblemError):
    status, code, title = 409, "project-exists", "The project exists already"


class EmptyGallery(ProblemError):
    status, code, title = 409, "empty-gallery", "The project has no reference photos yet"


class InvalidImportSource(ProblemError):
    status, code, title = 422, "invalid-import-source", "The import source cannot be read"
