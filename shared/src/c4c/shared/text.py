"""Text a database can store. PostgreSQL's text and jsonb refuse NUL (SQLite keeps it, so a
value would store on one and fail on the other), and no UTF-8 encodes a lone surrogate, which
a JSON ``"\\ud800"`` escape yields. A string that reaches the database is ``Storable`` (or a
form field carries ``STORABLE``), so that such input is a 422 problem, never a 500."""

from typing import Annotated

from pydantic import Field

STORABLE = r"^[^\x00]*$"
"""No NUL. Pydantic also refuses a lone surrogate in any string with a pattern: its regex
engine matches valid Unicode only."""

Storable = Annotated[str, Field(pattern=STORABLE)]
"""A string without NUL or lone surrogates; narrow it further with ``Annotated``
(``Annotated[Storable, Field(max_length=200)]``)."""
