"""The token layout of one transformer call: the latent grid and where the text tokens sit."""

from __future__ import annotations

import dataclasses

TEXT_POSITIONS = ("none", "before", "after")


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Video tokens are ordered `f*(H*W) + h*W + w` (3D patchify then flatten); text tokens, if the model runs
    joint attention, sit before (CogVideoX) or after (HunyuanVideo) them."""

    frames: int
    height: int
    width: int
    text_tokens: int = 0
    text_position: str = "none"

    def __post_init__(self):
        if min(self.frames, self.height, self.width) < 1:
            raise ValueError(f"token grid must be positive, got {self.frames}x{self.height}x{self.width}")
        if self.text_position not in TEXT_POSITIONS:
            raise ValueError(f"text_position must be one of {TEXT_POSITIONS}, got {self.text_position!r}")
        if (self.text_tokens > 0) != (self.text_position != "none"):
            raise ValueError("text_tokens > 0 needs text_position 'before' or 'after', and only then")

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def video_tokens(self) -> int:
        return self.frames * self.tokens_per_frame

    @property
    def total_tokens(self) -> int:
        return self.video_tokens + self.text_tokens

    @property
    def video_start(self) -> int:
        return self.text_tokens if self.text_position == "before" else 0
