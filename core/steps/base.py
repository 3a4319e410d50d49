"""The pass spec: everything about a step that is known without running it.

A spec is what the API checks a recipe against at POST /v1/jobs (names, configs, which formats
chain, what the job must give, which queue) and what the worker's pass adds ``run`` to
(worker.passes.base.Pass). Keeping it here lets the API and the CLI plan jobs without importing
any pass implementation.
"""

from __future__ import annotations

from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from core.formats import DEPLOY_FORMATS, SAME_AS_INPUT


class PassConfig(BaseModel):
    """Base for every pass's config: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


ConfigT = TypeVar("ConfigT", bound=PassConfig)


class PassSpec(Generic[ConfigT]):
    """One step's spec; one subclass per module in core/steps/, implemented by one pass in worker/passes/.

    Generic over its Config so that the config-dependent answers (queue, needs) are typed with the
    step's own Config; ``Config`` itself is that class (a ClassVar cannot name the type variable).
    """

    name: ClassVar[str]
    # The pass's code version: part of every cache key, so a change to what the pass makes is
    # bumped here and no earlier result is reused. Every spec declares its own.
    version: ClassVar[int]
    description: ClassVar[str]
    Config: ClassVar[type[PassConfig]] = PassConfig
    accepts: ClassVar[frozenset[str]]
    # The format it produces; None for analysis passes that leave the chain's artifact as is;
    # core.formats.SAME_AS_INPUT for a step whose artifact keeps its input's format.
    produces: ClassVar[str | None]
    needs: ClassVar[frozenset[str]] = frozenset()
    queue: ClassVar[str] = "cpu"
    # Turns its input into a torch module to train or prune (worker.trainable): an ONNX model's operators
    # must all convert (core.onnx_ops), checked at POST /v1/jobs where the upload lists them.
    trains: ClassVar[bool] = False
    # Its artifact ends its branch, as deployment formats always do: the next producing step starts from
    # the model this one started from (quantize_qat: a candidate beside the post-training INT8, not after it).
    ends_branch: ClassVar[bool] = False
    # For input formats it does not accept: what the user should do instead (shown in the 422).
    format_hints: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__ and not isinstance(cls.__dict__.get("version"), int):
            raise TypeError(f"step {cls.name!r} declares no version (an int; it enters the cache key)")

    @classmethod
    def advances_chain(cls) -> bool:
        """Whether the next step starts from this step's artifact (a measuring step leaves the chain as it is)."""
        return cls.produces not in DEPLOY_FORMATS and not cls.ends_branch

    def output_format(self, input_format: str) -> str:
        return input_format if self.produces in (None, SAME_AS_INPUT) else self.produces

    def step_queue(self, config: ConfigT) -> str:
        """Where this step must run: cpu (any worker), gpu (any GPU worker) or gpu.<kind>."""
        return self.queue

    def requirements(self, config: ConfigT) -> frozenset[str]:
        """What this step needs from the job with this config (checked at POST /v1/jobs)."""
        return self.needs
