"""The strict base of every config section: an unknown or misspelled key fails at load time."""

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
