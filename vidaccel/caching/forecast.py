"""The residual a skipped span stands in with: the last computed one, or a TaylorSeer forecast.

TaylorSeer reads the residuals of computed steps as samples of a smooth function of the step index. At each
computed step ``t`` it keeps ``r(t)`` and finite-difference estimates of its first ``order`` derivatives,
``d_k(t) = (d_{k-1}(t) - d_{k-1}(t_prev)) / (t - t_prev)``, and forecasts a skipped step ``s`` with the Taylor
polynomial ``sum_k d_k(t) (s - t)^k / k!``. Derivatives only exist once enough computed steps have been seen;
until then the forecast uses the terms it has (order 0 is plain reuse). With ``order >= 1`` the terms are kept
in float32: finite differences of bf16 residuals would be mostly rounding noise.
"""

from __future__ import annotations

from typing import Callable

import torch

from .block_skip import Streams


def _map(fn: Callable[..., torch.Tensor], *streams: Streams) -> Streams:
    encoder = None
    if all(s.encoder is not None for s in streams):
        encoder = fn(*(s.encoder for s in streams))
    return Streams(fn(*(s.hidden for s in streams)), encoder)


class ResidualForecaster:
    """Residual history of one (transformer, branch) within one generation."""

    def __init__(self, order: int = 0):
        if order not in (0, 1, 2):
            raise ValueError(f"TaylorSeer order must be 0 (reuse), 1 or 2, got {order}")
        self.order = order
        self.step: int | None = None  # step of the last computed residual
        self._terms: list[Streams] = []  # r, dr/ds, d2r/ds2 at `step`
        self._dtype: torch.dtype | None = None

    @property
    def ready(self) -> bool:
        return bool(self._terms)

    @property
    def terms_available(self) -> int:
        """How many Taylor terms a forecast uses now (1 = plain reuse)."""
        return len(self._terms)

    def update(self, step: int, residual: Streams) -> None:
        """Record the residual of a computed step."""
        if self.order == 0:
            self._terms, self.step = [residual], step
            return
        self._dtype = residual.hidden.dtype
        terms = [_map(lambda t: t.float(), residual)]
        if self._terms and self.step is not None and step > self.step:
            gap = float(step - self.step)
            for k in range(1, min(self.order, len(self._terms)) + 1):
                terms.append(_map(lambda new, old: (new - old) / gap, terms[k - 1], self._terms[k - 1]))
        self._terms, self.step = terms, step

    def predict(self, step: int) -> Streams:
        """The residual to replay at `step` (a step after the last computed one)."""
        if not self._terms:
            raise RuntimeError("no computed residual to forecast from")
        if self.order == 0:
            return self._terms[0]
        forecast = self._terms[0]
        factor = 1.0
        for k in range(1, len(self._terms)):
            factor *= (step - self.step) / k
            forecast = _map(lambda acc, term: acc + term * factor, forecast, self._terms[k])
        return _map(lambda t: t.to(self._dtype), forecast)
