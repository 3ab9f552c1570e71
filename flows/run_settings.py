"""How a batch runs, as one typed value: the caller's word, else the batch file's, else the default.

``dispatch run`` flags, the flow's parameters and a batch file's keys all
say the same five things; ``RunSettings.resolve`` merges them once, and the
policies the engine runs by (``batch_policy``, ``retry_policy``) are derived
here, so no default is written twice and nothing reads a setting by string.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from dispatchers.base import DEFAULT_TIMEOUT
from dispatchers.batch import BatchPolicy, ExecutionMode
from dispatchers.policy import RetryPolicy

if TYPE_CHECKING:
    from .batch_file import BatchFile

__all__ = ["Concurrency", "Retries", "RunSettings", "Seconds"]

#: Seconds for a whole batch.
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
#: Retries of a transient failure, after the first try.
Retries = Annotated[int, Field(ge=0)]
#: Commands at once, in parallel mode.
Concurrency = Annotated[int, Field(ge=1)]


class RunSettings(BaseModel):
    """The settings of one batch run, each with its default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    timeout: Seconds = DEFAULT_TIMEOUT
    mode: ExecutionMode = ExecutionMode.SEQUENTIAL
    stop_on_failure: bool = False
    retries: Retries = 2
    max_concurrency: Concurrency = 8

    @classmethod
    def resolve(cls, batch: BatchFile | None = None, **given: Any) -> RunSettings:
        """Each setting: the value given (not None), else the batch file's (not None), else the default."""
        unknown = set(given) - set(cls.model_fields)
        if unknown:
            raise TypeError(f"not run settings: {', '.join(sorted(unknown))}")
        chosen = {}
        for name in cls.model_fields:
            value = given.get(name)
            if value is None and batch is not None:
                value = getattr(batch, name)
            if value is not None:
                chosen[name] = value
        return cls.model_validate(chosen)

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of setting ``name``, for a help text."""
        return cls.model_fields[name].default

    @property
    def batch_policy(self) -> BatchPolicy:
        return BatchPolicy(self.mode, self.stop_on_failure, self.max_concurrency)

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(attempts=self.retries + 1)
