"""Which weights the policy app should serve: a detached Ray actor the loop publishes to
and every replica follows."""

from __future__ import annotations

import uuid


# The registry is a detached actor in this namespace: the policy app outlives the job
# that deployed it (Serve apps are detached), so what its replicas look up must too.
# A job-owned registry died with its job, and the surviving replicas, restarted by
# Serve, failed in their constructor ("Failed to look up actor") until the app was
# marked failed: a resumed run could not deploy the app, and it answered 503.
REGISTRY_NAMESPACE = "raydpo"


class PolicyRegistry:
    """Which weights the policy app should serve. One per app, a named detached Ray
    actor: the loop publishes here; replicas poll, load and acknowledge."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """A new run takes the app over: a new epoch, and versions count from its own
        publishes again. Acks from replicas of an earlier epoch never count."""
        self.epoch = uuid.uuid4().hex
        self.version = 0
        self.payload: list | None = None  # [raydpo.weights.StoredWeights or None, path or None]
        self.acks: dict[str, int] = {}
        self.errors: dict[str, str] = {}  # replica -> why it could not load the published version

    def publish(self, version: int, payload: list) -> None:
        if version <= self.version:
            raise ValueError(f"policy versions must increase: {version} after {self.version}")
        self.version, self.payload = version, payload

    def current(self) -> tuple[str, int, list | None]:
        return self.epoch, self.version, self.payload

    def ack(self, replica: str, epoch: str, version: int, error: str | None = None) -> None:
        if error:  # also from a replica that failed to load this owner's first version
            self.errors[replica] = error
        else:
            self.errors.pop(replica, None)
        if epoch == self.epoch:  # else: a replica still serving an earlier run's weights
            self.acks[replica] = version

    def serving(self) -> dict[str, int]:
        return dict(self.acks)

    def update_errors(self) -> dict[str, str]:
        return dict(self.errors)

