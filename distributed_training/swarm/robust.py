"""The robust mean every reducer of an all-reduce part computes: no single sender can wreck the average.

hivemind's reducer adds each sender's part, times the weight the sender declares, and divides: one
NaN makes every parameter of every member NaN, and one part scaled by -100 or a declared weight of
1e9 sets the direction of the whole swarm. Here a reducer waits for every sender's part and then:

1. rejects a part, or a weight, that is not finite (the sender counts with weight 0);
2. caps each declared weight at `weight_cap` times the median weight, so nobody outvotes the group;
3. takes the coordinate-wise median of the parts as the center `c`, and clips every part's
   distance to it at `tau = clip_factor * median_i ||x_i - c||` (one step of CenteredClip);
   a part beyond `strike_factor` median distances (allowing for a sender's smaller sample count)
   is a strike against its sender where at least four sent, one beyond `ban_factor` median
   distances or `norm_ban_factor` (6) median part norms a ban (`guard.py`): with three senders, two
   honest parts that differ put a random part ten times their norm near 16 median distances, but
   an honest part stays within its norm plus the center's, about 3 median norms (a sender of more
   samples is judged against its count: its DiLoCo pseudo-gradient is longer);
4. returns `c + sum_i w_i * clip(x_i - c) / sum_i w_i`.

The bound: member j's term is `w_j * clip(x_j - c) / W`, of norm at most `w_j * tau / W`, however it
scales or randomises its part; `c` and `tau` are medians, so while the others are a majority they
stay within the others' range. When no member is clipped (honest peers of one swarm, `clip_factor`
large enough) step 4 is exactly the weighted mean, so honest training loses nothing.

With fewer than three usable senders there is no majority to be robust with: the result is then the
capped weighted mean of the finite parts, and no sender is judged by distance.

Every member's reducer is deterministic in the parts it received, and each part has one reducer
whose output is sent, as the same bytes, to every member (the consensus all-reduce).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Optional, Sequence

import torch

NON_FINITE = "non-finite"
CLIPPED = "clipped"  # farther than `strike_factor` median distances, even for its sample count: a strike
FAR_OFF = "far-off"  # farther than `ban_factor` median distances: banned at once, like a non-finite part


MIN_MAJORITY = 3  # senders with a finite part below which distances say nothing (one of two is no outlier)
# senders below which a moderate distance is no strike: of three honest gradients one is often 4 medians off
# (measured: an honest miner clipped in 2 of 3 rounds of a three-miner run); 16 medians still bans
MIN_STRIKE_SENDERS = 4


class NothingToAverage(ValueError):
    """No sender contributed a finite part with a positive weight."""


@dataclass(frozen=True)
class RobustRule:
    clip_factor: float = 2.0  # parts farther than this many median distances from the center are clipped
    weight_cap: float = 4.0  # a declared weight counts at most this many median weights
    strike_factor: float = 4.0  # farther than this (for its sample count): a strike against the sender
    ban_factor: float = 16.0  # farther than this: the sender is banned at once
    # farther from the center than this many median part norms (allowing for a sender's larger sample
    # count, whose DiLoCo pseudo-gradient is longer): banned at once
    norm_ban_factor: float = 6.0
    # a reducer's average longer (against a member's own parts of its span) than this many times the
    # median reducer's is refused by the member, and the reducer banned (`ConsensusAllReduceRunner`)
    output_bound: float = 8.0

    def __post_init__(self) -> None:
        if not self.clip_factor >= 1.0:
            raise ValueError(f"clip_factor must be at least 1 (the median member is never clipped), not {self.clip_factor}")
        if not self.ban_factor >= self.strike_factor >= 1.0:
            raise ValueError(f"need ban_factor >= strike_factor >= 1, not {self.ban_factor}, {self.strike_factor}")
        if not self.norm_ban_factor >= 4.0:
            raise ValueError(f"norm_ban_factor must be at least 4 (an honest part's distance reaches about 3 "
                             f"median norms), not {self.norm_ban_factor}")
        if not self.output_bound >= 4.0:
            raise ValueError(f"output_bound must be at least 4 (honest spans' averages differ by about 2), "
                             f"not {self.output_bound}")
        if not self.weight_cap >= 1.0:
            raise ValueError(f"weight_cap must be at least 1, not {self.weight_cap}")


def _lower_median(values: torch.Tensor) -> torch.Tensor:
    return values.median(dim=0).values  # torch's median is the lower one for an even count: a member's own value


def _usable(parts: Sequence[torch.Tensor], weights: Sequence[float], rule: RobustRule):
    """Each sender's verdict so far (non-finite or None), the senders that count, their parts stacked
    as float32 rows, their capped weights and the median weight."""
    if len(parts) != len(weights) or not parts:
        raise ValueError(f"{len(parts)} parts and {len(weights)} weights")
    verdicts: list[Optional[str]] = [None] * len(parts)
    usable = []
    for i, (part, weight) in enumerate(zip(parts, weights)):
        if not (isinstance(weight, (int, float)) and weight == weight and 0 <= weight < float("inf")) \
                or not bool(torch.isfinite(part).all()):
            verdicts[i] = NON_FINITE
        elif weight > 0:
            usable.append(i)
    if not usable:
        raise NothingToAverage("no sender contributed a finite part with a positive weight")
    stacked = torch.stack([parts[i].reshape(-1).to(torch.float32) for i in usable])
    declared = torch.tensor([float(weights[i]) for i in usable], dtype=torch.float32)
    median_weight = _lower_median(declared)  # also the capped weights' median: the cap is at least 1 median
    return verdicts, usable, stacked, torch.minimum(declared, rule.weight_cap * median_weight), median_weight


def _center(stacked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The coordinate-wise median, each row's offset from it, their norms and the median norm."""
    center = _lower_median(stacked)
    offsets = stacked - center
    distances = offsets.norm(dim=1)
    return center, offsets, distances, _lower_median(distances)


def robust_average(parts: Sequence[torch.Tensor], weights: Sequence[float], rule: RobustRule,
                   ignored: Collection[int] = ()) -> tuple[torch.Tensor, list[Optional[str]]]:
    """The robust mean of `parts` (one per sender, same shape) and each sender's verdict (None: used as sent).
    `ignored`: senders whose part counts for nothing (weight 0) but is judged all the same."""
    verdicts, usable, stacked, capped, median_weight = _usable(parts, weights, rule)
    shape, dtype = parts[usable[0]].shape, parts[usable[0]].dtype
    if len(usable) < MIN_MAJORITY:  # no majority to measure a distance against: the weighted mean, unclipped
        if ignored:
            _judge_ignored(parts, verdicts, ignored, usable, stacked, _lower_median(stacked), None, rule)
        return ((capped @ stacked) / capped.sum()).reshape(shape).to(dtype), verdicts

    center, offsets, distances, spread = _center(stacked)
    tau = rule.clip_factor * spread
    scale = torch.where(distances > tau, tau / distances.clamp_min(1e-30), torch.ones_like(distances))
    # A mean over few samples is noisier (its distance grows as 1/sqrt(samples)): such a part is clipped
    # like any other, but counts against its sender only if it is far even for its sample count.
    excess = distances * torch.sqrt(torch.minimum(capped, median_weight) / median_weight)
    median_norm = _lower_median(stacked.norm(dim=1))
    # a pseudo-gradient of more inner steps is longer (about in proportion): judged against its own count
    long_excess = excess * torch.clamp(median_weight / capped, max=1.0)
    for row, i in enumerate(usable):
        if excess[row] > rule.ban_factor * spread or long_excess[row] > rule.norm_ban_factor * median_norm:
            verdicts[i] = FAR_OFF
        elif excess[row] > rule.strike_factor * spread and len(usable) >= MIN_STRIKE_SENDERS:
            verdicts[i] = CLIPPED
    if ignored:
        _judge_ignored(parts, verdicts, ignored, usable, stacked, center, spread, rule)

    average = center + (capped * scale) @ offsets / capped.sum()
    return average.reshape(shape).to(dtype), verdicts


def _judge_ignored(parts: Sequence[torch.Tensor], verdicts: list[Optional[str]], ignored: Collection[int],
                   usable: Sequence[int], stacked: torch.Tensor, center: torch.Tensor, spread: Optional[torch.Tensor],
                   rule: RobustRule) -> None:
    """Judge the parts counted for nothing (senders banned on another reducer's word) all the same, as if of
    the median weight: else a poisoner that a framer named would be ignored by all and caught by none. With
    fewer counted senders than `MIN_MAJORITY` only the norm rule applies (an honest part is within about 3
    median norms of another). A zero-weight tag-along of hivemind's (a peer loading state) is not judged:
    its gradient may be of an old model."""
    median_norm = _lower_median(stacked.norm(dim=1))
    for i in ignored:
        if verdicts[i] is None and i not in usable:
            distance = (parts[i].reshape(-1).to(torch.float32) - center).norm()
            far = spread is not None and distance > rule.ban_factor * spread
            if far or distance > rule.norm_ban_factor * median_norm:
                verdicts[i] = FAR_OFF


def influence_bound(weights: Sequence[float], member: int, parts: Sequence[torch.Tensor], rule: RobustRule) -> float:
    """How far member `member`'s term can move `robust_average(parts, weights)`: w_j * tau / W (see the module doc)."""
    _, usable, stacked, capped, _ = _usable(parts, weights, rule)
    spread = _center(stacked)[3]
    return float(capped[usable.index(member)] * rule.clip_factor * spread / capped.sum())


# A reducer sees only its share of each sender's vector, so a sender that poisons one part is caught by
# one reducer alone; if only that reducer banned it, the honest peers would disagree on whom to group
# with and drift apart. So each reducer sends its verdicts on a part back with the part (in the reply's
# otherwise unused `weight` field: senders whose part was not finite in the low bits, clipped ones above),
# and every member of a round adopts the same union of verdicts: every member bans alike.
_MASK_BITS = 17  # senders a verdict mask can name (the rest of a larger group is judged locally only)


def credible_mask(verdicts: dict[int, str], reducer: int, num_senders: int) -> bool:
    """Whether a remote reducer's verdicts can be taken at its word: they name at most a minority of the
    other senders (at least one). A reducer that damns most of its group is the likelier liar, and the
    robust mean assumes the honest are a majority anyway."""
    named = sum(1 for sender in verdicts if sender != reducer)
    return named <= max(1, (num_senders - 1) // 2)
_RANK = {None: 0, CLIPPED: 1, FAR_OFF: 2, NON_FINITE: 3}


def round_verdicts(found: dict[int, list[str]], parts: int) -> dict[int, str]:
    """A round's verdict per sender from its verdicts on `parts` parts: non-finite in any part counts; a
    distance only in most parts, since a sparse gradient (embedding rows of tokens only one sender saw)
    is far off in a few parts honestly."""
    verdicts = {}
    for sender, kinds in found.items():
        if NON_FINITE in kinds:
            verdicts[sender] = NON_FINITE
        elif 2 * len(kinds) > parts:
            verdicts[sender] = FAR_OFF if 2 * kinds.count(FAR_OFF) > parts else CLIPPED
    return verdicts


def stray_averages(spans: dict[str, tuple[float, float, float]], factor: float, directional: bool = True
                   ) -> dict[str, str]:
    """The reducers whose average is out of bound against one member's own parts of their span, from
    `spans` {reducer: (|own parts|^2, |average|^2, own . average)}: more than `factor` times longer
    (relative to the own parts) than the lower-median reducer's, or, if `directional`, pointing away from
    the own parts (negative cosine) while the median reducer's points along them. An honest average that
    counts the member's part points its way; one that counts it for nothing (a ban) need not, so a member
    that may be banned passes `directional=False`. How far it points differs by span (rows of the tied
    embedding are alike in every member, transformer weights mostly batch noise: cosines of 0.8 and 0.13
    in one local-swarm round), so only the sign is held against a reducer. A scaled or reversed average
    is caught; a random one within the length bound is not. Returns {reducer: the figures}."""
    usable = {r: v for r, v in spans.items() if v[0] > 0 and v[1] > 0 and all(x == x for x in v)}
    if not usable:
        return {}
    ratios = {r: (averaged / own) ** 0.5 for r, (own, averaged, _) in usable.items()}
    cosines = {r: dot / (own * averaged) ** 0.5 for r, (own, averaged, dot) in usable.items()}
    median_ratio = sorted(ratios.values())[(len(ratios) - 1) // 2]
    median_cosine = sorted(cosines.values())[len(cosines) // 2]  # the upper median: the honest side of a pair
    return {r: f"length x{ratios[r] / median_ratio:.3g} the median reducer's, "
               f"cosine {cosines[r]:.3g} against its {median_cosine:.3g}, {len(usable)} spans"
            for r in usable if ratios[r] > factor * median_ratio
            or (directional and median_cosine > 0.05 and cosines[r] < 0)}


def worse(first: Optional[str], second: Optional[str]) -> Optional[str]:
    """The graver of two verdicts."""
    return first if _RANK[first] >= _RANK[second] else second


def encode_verdicts(verdicts: dict[int, Optional[str]]) -> float:
    """Three masks in one float: non-finite senders in the low bits, far-off ones above, clipped ones on top."""
    mask = 0
    for field, kind in enumerate((NON_FINITE, FAR_OFF, CLIPPED)):
        mask += sum(1 << i for i, v in verdicts.items() if v == kind and i < _MASK_BITS) << (field * _MASK_BITS)
    return float(mask)


def decode_verdicts(mask: float, num_senders: int) -> dict[int, str]:
    """A reducer's verdicts from its reply; anything that is not a well-formed mask says nothing."""
    if not (mask == mask and 0 <= mask < 2.0 ** (3 * _MASK_BITS)) or mask != int(mask):
        return {}
    bits = int(mask)
    verdicts = {}
    for i in range(min(num_senders, _MASK_BITS)):
        for field, kind in enumerate((NON_FINITE, FAR_OFF, CLIPPED)):
            if bits >> (i + field * _MASK_BITS) & 1:
                verdicts[i] = kind
                break
    return verdicts
