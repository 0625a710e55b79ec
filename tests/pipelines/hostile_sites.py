"""A buggy or hostile site for tests: a site (or a site handler behind a real gRPC server)
whose trained update or evaluation reply is altered on its way out; everything else passes
through unchanged."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from twin_core.federation import SiteEvaluation, SiteUpdate


class Tampered:
    """`update(weights) -> weights` alters each trained update's weights,
    `evaluation(statistics) -> statistics` each evaluation reply's statistics."""

    def __init__(
        self,
        inner,
        update: Callable[[dict], dict] | None = None,
        evaluation: Callable[[dict], dict] | None = None,
    ):
        self.inner, self.update, self.evaluation = inner, update, evaluation

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def train(self, *args, **kwargs) -> SiteUpdate:
        reply = self.inner.train(*args, **kwargs)
        if self.update is None:
            return reply
        return replace(reply, weights=self.update(dict(reply.weights)))

    def evaluate(self, *args, **kwargs) -> SiteEvaluation:
        reply = self.inner.evaluate(*args, **kwargs)
        if self.evaluation is None:
            return reply
        return replace(reply, statistics=self.evaluation(dict(reply.statistics)))
