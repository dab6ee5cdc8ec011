"""What a UNet's encoder hands its decoder: the networks split ``forward`` into ``encode`` and ``decode``, so a
caller can take the encoder's features (the GAN classifier reads the bottleneck) and decode only some samples."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import Tensor


@dataclass
class Encoding:
    """The encoder's outputs for a batch of B samples."""

    h: Tensor                      # the bottleneck, the encoder's last output [B,C',H',W']
    emb: Tensor                    # the conditioning vector (noise level, class) [B,E]
    skips: list[Tensor]            # the encoder outputs the decoder concatenates, in encoder order

    def first(self, n: int) -> "Encoding":
        """The encoding of the first n samples."""
        return Encoding(self.h[:n], self.emb[:n], [s[:n] for s in self.skips])


def encoder_features(enc: Encoding, resolutions: Sequence[int]) -> list[Tensor]:
    """The encoder's last output at each of ``resolutions`` (px): at every level of a UNet, the output of its last
    block before the next downsampling. [B,C_r,r,r] each."""
    last = {s.shape[-1]: s for s in enc.skips}
    missing = [r for r in resolutions if r not in last]
    if missing:
        raise ValueError(f"the encoder has no output at {missing} px (it has {sorted(last, reverse=True)})")
    return [last[r] for r in resolutions]
