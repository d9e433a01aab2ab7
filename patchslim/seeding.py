"""Random numbers that belong to an image: the same draws for an image whatever batch it is in.

A method that draws random numbers (``random``, ``rl`` with ``sample=true``) must give an image the same tokens
alone, in a batch of 8 or of 500, at any position: otherwise a seeded table moves when the evaluation's batch size
changes. One generator shared by the batch cannot do that (image 3 would get the numbers after images 0-2's). So
every image gets its own generator, seeded by the plan's seed and a key computed from the image's own input tensor
(:func:`image_keys`), and the draws of a forward advance each image's generator by what that image used.

The key is an exact integer function of the float32 input's bits, so it does not depend on the batch, the device
or the order of a reduction (integer sums are exact). Two identical images get identical draws, which is what
"the same result whatever batch" asks.
"""

from __future__ import annotations

import functools

import torch

_MASK64 = (1 << 64) - 1


def image_keys(images: torch.Tensor) -> list[int]:
    """One 64-bit key per image of ``images`` (``[B, ...]`` float32), from its bits alone.

    The low and the high 16 bits of every value, each summed with odd position weights ``w_j < 2^13``: every term
    is below 2^29, so both int64 sums are exact for any input size that fits in memory, in any summation order,
    and a change of any one bit changes a sum.
    """
    flat = images.detach().reshape(images.shape[0], -1).to(torch.float32).contiguous()
    bits = flat.view(torch.int32)
    weights = _position_weights(flat.shape[1], str(flat.device))
    low = torch.zeros(flat.shape[0], dtype=torch.int64, device=flat.device)
    high = torch.zeros_like(low)
    # in slices, so the temporary stays small next to the forward's own activations (the memory estimate does not
    # count it, and a whole-batch copy would be the largest tensor of a small model's forward): a slice holds
    # _KEY_ELEMENTS values of the batch, at least _KEY_SLICE per image, worked on in one buffer in place (one
    # 128 KiB temporary, where two 64 KiB ones lived at once before, in twice as many slices)
    step = min(flat.shape[1], max(_KEY_SLICE, _KEY_ELEMENTS // flat.shape[0]))
    buffer = torch.empty(flat.shape[0], step, dtype=torch.int32, device=flat.device)
    for start in range(0, flat.shape[1], step):
        part, w = bits[:, start:start + step], weights[start:start + step]
        work = buffer[:, : part.shape[1]]
        # each product is below 2^29 in magnitude, so it is exact in int32; the sums run in int64
        low += torch.bitwise_and(part, 0xFFFF, out=work).mul_(w).sum(1, dtype=torch.int64)
        high += torch.bitwise_right_shift(part, 16, out=work).mul_(w).sum(1, dtype=torch.int64)
    return [mix(h, lo & _MASK64) for lo, h in zip(low.tolist(), high.tolist())]


_KEY_SLICE = 4096  # the fewest values per image in a slice of image_keys' sums
_KEY_ELEMENTS = 1 << 15  # values of the whole batch in one slice (128 KiB, the one int32 buffer)


@functools.lru_cache(maxsize=8)
def _position_weights(length: int, device: str) -> torch.Tensor:
    """The odd weights ``w_j < 2^13`` of :func:`image_keys` (made once per input size and device)."""
    return (torch.arange(length, device=device, dtype=torch.int32) % 4093) * 2 + 1


def mix(seed: int, key: int) -> int:
    """A 64-bit generator seed from a plan seed and an image key (splitmix64's finalizer over both)."""
    z = (key ^ ((seed & _MASK64) * 0x9E3779B97F4A7C15)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class ImageRandom:
    """Per-image random streams for one forward, created when first drawn from.

    Args:
        seed: the plan's seed.
        images: ``[B, C, H, W]`` the forward's input (read once, at the first draw).
    """

    def __init__(self, seed: int, images: torch.Tensor) -> None:
        self.seed = seed
        self._images: torch.Tensor | None = images
        self._generators: list[torch.Generator] | None = None

    @property
    def batch(self) -> int:
        return len(self.generators)

    @property
    def generators(self) -> list[torch.Generator]:
        """One CPU generator per image, seeded by :func:`mix` of the seed and :func:`image_keys`."""
        if self._generators is None:
            keys = image_keys(self._images)
            self._generators = [torch.Generator().manual_seed(mix(self.seed, k)) for k in keys]
            self._images = None  # the keys are all that is needed from the input
        return self._generators

    def rand(self, rows: int, count: int, groups: int = 1, device: torch.device | str | None = None) -> torch.Tensor:
        """``[rows, count]`` uniform numbers in [0, 1), each row from the stream of the image it belongs to.

        Rows follow the engine's layouts: ``groups`` rows per image, image-major (``[B * W, n]``, a windowed model's
        tokens), or, with ``groups = 1``, ``rows = S * B`` copies of the batch (row ``s * B + b`` is image ``b``, as
        :func:`patchslim.tokens.repeat_batch` lays them out). An image draws its rows in order, one after the other.

        Raises:
            ValueError: ``rows`` fits neither layout for this batch.
        """
        batch = self.batch
        if groups > 1:
            if rows != batch * groups:
                raise ValueError(f"{rows} rows are not {groups} window groups for each of {batch} images")
            draws = [torch.rand(groups, count, generator=g) for g in self.generators]
            out = torch.stack(draws).reshape(rows, count)
        else:
            if rows % batch:
                raise ValueError(f"{rows} rows are not copies of a batch of {batch} images")
            copies = rows // batch
            draws = [torch.rand(copies, count, generator=g) for g in self.generators]
            out = torch.stack(draws, dim=1).reshape(rows, count)
        return out if device is None else out.to(device)
