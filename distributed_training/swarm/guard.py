"""Who an averager lets into its groups: admitted peers that are not banned, decided in one place.

Each averager (the gradient and state averagers of swarm mode, DiLoCo's outer averager) runs its
RPCs and all-reduces in its own hivemind process, and holds its own `AveragingGuard` there (given
at construction, so it is in force from the first RPC). The guard answers `refuse(peer, where)`
for every peer that asks to join a group this peer leads, sends it parts, asks for its state, or
is listed in a group it was put in; and hears, after each all-reduce, what this peer's reducer
found wrong with each sender (`robust.NON_FINITE`, `robust.CLIPPED`).

Bans count in all-reduce rounds of that averager: one round is one global epoch in both modes.
A sender whose parts were not finite, or far beyond everyone else's (`robust.FAR_OFF`), is banned
at once; one clipped beyond the strike distance in `clip_strikes` consecutive rounds is banned too.
A banned peer is refused for `ban_rounds` rounds, then admitted again (its strikes start over); each
further ban of the same peer lasts twice as long as the one before. Bans are posted on the board
with their reason, which `ban_records` publishes for validators, and so is each verdict of this peer's
own reducer that the rule counts (`verdict_reports`). Refusals are logged once per peer and reason.
A peer the board refuses counts for nothing in this peer's progress either (`unbanned`): its samples
would not be in the average, so counting them would end epochs on less of the swarm's work.

Who saw it matters. A ban on this peer's own finding (its reducer's verdict, a reducer's word on
itself, or a reducer caught lying) refuses the peer at matchmaking and state sharing and is
published to validators. One on another reducer's word (`HEARD`) makes this peer's reducer count
the accused's parts for nothing (with three senders a noise poisoner is far off in one reducer's span
and only clipped in another's) and refuses it only as a leader to follow, and is never published:
a lying reducer can then neither cut its victim off nor have it accused. A group already formed is
never failed for a ban (`ignore`): members ban on what each saw, and failing would fork the swarm
over one member's view. A member that a reducer named holds no reducer's average to its direction
for as long as the ban could last (`named_recently`): reducers that took the word may be leaving its
parts out, so their averages need not point its way.
A reducer that calls this peer's finite parts non-finite, or whose average is out of bound
(`ConsensusAllReduceRunner.out_of_bound_reducers`), lied: this peer bans it on its own finding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence, TypeVar

from .robust import CLIPPED, FAR_OFF, NON_FINITE
from .verdict_reports import post_verdicts

logger = logging.getLogger(__name__)

REPORT = ".report"  # the suffix of a board entry that is published but not refused (`post_ban`)
HEARD = ".heard"  # the suffix of a board entry ignored and refused as a leader, never published (another reducer's word)
NEVER = 2 ** 62  # `clip_strikes` that no run reaches: clipping alone never bans

# Returns None if the peer (base58 id) may average with this one, else why not.
PeerAdmission = Callable[[str], Optional[str]]


@dataclass(frozen=True)
class BanRule:
    ban_rounds: int = 10  # rounds a banned peer is refused
    clip_strikes: int = 3  # consecutive clipped rounds that earn a ban (honest sparse gradients are clipped now and then)
    ban_far_off: bool = True  # a part far beyond every other member's is banned at once

    def __post_init__(self) -> None:
        if self.ban_rounds < 1 or self.clip_strikes < 1:
            raise ValueError(f"ban_rounds and clip_strikes must be at least 1, not {self.ban_rounds}, {self.clip_strikes}")


def _board_names(board: Path) -> list[str]:
    try:
        return [entry.name for entry in board.iterdir()]
    except OSError:
        return []


def board_entry(name: str) -> tuple[str, str, str]:
    """(source, peer, kind) of a board entry's file name `<source>-<peer>[suffix]`; kind is "refused"
    (no suffix), "heard" (`HEARD`) or "report" (`REPORT`). The peer follows the last dash: averager
    names hold dashes ("pseudo-gradients"), peer ids never do."""
    kind, stem = "refused", name
    for suffix, named in ((HEARD, "heard"), (REPORT, "report")):
        if name.endswith(suffix):
            kind, stem = named, name.removesuffix(suffix)
    source, _, peer = stem.rpartition("-")
    return source, peer, kind


def board_refuses(board: Path, peer: str) -> bool:
    """Whether an entry on `board` refuses `peer` outright: a ban this peer's own averagers or checks
    found (peer ids compared exactly: a peer id is never a pattern)."""
    return any(board_entry(name)[1:] == (peer, "refused") for name in _board_names(board))


def board_ignores(board: Path, peer: str) -> bool:
    """Whether `peer`'s parts count for nothing here: refused, or banned on another reducer's word."""
    return any(board_entry(name)[1:] in ((peer, "refused"), (peer, "heard")) for name in _board_names(board))


Binding = TypeVar("Binding")


def unbanned(bindings: Callable[[Sequence[str]], Mapping[str, Binding]], board: Path
             ) -> Callable[[Sequence[str]], dict[str, Binding]]:
    """`bindings` (a `progress.BindingLookup`) without the peers `board` refuses: whose progress counts."""
    def lookup(peers: Sequence[str]) -> dict[str, Binding]:
        return {peer: binding for peer, binding in bindings(peers).items() if not board_refuses(board, peer)}
    return lookup


def post_ban(board: Path, source: str, peer: str, reason: str, refuse: bool = True) -> None:
    """Accuse `peer` from outside the averagers (`source`: what caught it, one word, e.g. "progress" for
    an impossible progress record, "state" for a forged state). The accusation is published to
    validators (`ban_records`) and holds while the process lives. With `refuse` every averager of this
    process also refuses the peer: only for what every honest peer sees alike (a record in the DHT);
    a forgery only this peer was served is reported, not refused, or this peer alone would refuse
    groups the others form with it and break their rounds."""
    if "-" in source or not source:
        raise ValueError(f"a ban's source is one word without '-', not {source!r}")
    try:
        (board / f"{source}-{peer}{'' if refuse else REPORT}").write_text(reason[:200])
    except OSError as exc:
        logger.warning("could not post the ban of %s (%s): %s", peer, reason, exc)


class AveragingGuard:
    def __init__(self, name: str, rule: BanRule = BanRule(), admit: Optional[PeerAdmission] = None,
                 on_ban: Optional[Callable[[str, str], None]] = None, board: Optional[Path] = None):
        """`name` says which averager in the log; `admit` checks a peer beyond bans (its binding);
        `on_ban(peer, reason)` hears each new ban (for the miner's metrics); `board` is a directory the
        guards of one peer's averagers share (they run in separate processes): a peer one of them bans
        is refused by all while that ban lasts, so the gradient and parameter averagers never disagree."""
        self.name, self.rule, self.admit, self.on_ban, self.board = name, rule, admit, on_ban, board
        self.rounds = 0
        self.banned_until: dict[str, int] = {}  # peer -> first round it is admitted again
        self.strikes: dict[str, int] = {}
        self.offences: dict[str, int] = {}  # bans so far, by peer: each doubles the next one
        self.hearsay: set[str] = set()  # banned peers whose ban rests on another reducer's word only
        self.times_named, self.named_until = 0, 0  # rounds a remote reducer named this peer; until when it matters
        self._logged: set[tuple[str, str, Optional[str]]] = set()

    def _posted(self, peer: str, heard: bool = False) -> Path:
        return self.board / f"{self.name}-{peer}{HEARD if heard else ''}"

    def ban_reason(self, peer: str, heard: bool = False) -> Optional[str]:
        """Why `peer` is banned here, if it is: on this peer's own finding, or also (`heard`) on another
        reducer's word."""
        until = self.banned_until.get(peer)
        if until is not None and self.rounds >= until:
            del self.banned_until[peer]
            self.hearsay.discard(peer)
            if self.board is not None:
                self._posted(peer).unlink(missing_ok=True)
                self._posted(peer, heard=True).unlink(missing_ok=True)
            until = None
        if until is not None and (heard or peer not in self.hearsay):
            return f"banned for {until - self.rounds} more round(s)"
        if self.board is not None and (board_ignores if heard else board_refuses)(self.board, peer):
            return "banned by another part of this peer"
        return None

    def refuse(self, peer: str, where: str) -> Optional[str]:
        """None if `peer` may take part at `where` (matchmaking, state, ...), else why not: no admission,
        or a ban on this peer's own finding. A ban on another reducer's word refuses the peer only as a
        leader to follow ("leader"): it still joins groups this peer or others lead, where its parts count
        for nothing (`ignore`), so that a framed peer is not cut off and a poisoner's witnesses and those
        that took their word end up in one group rather than two."""
        reason = self.ban_reason(peer, heard=where == "leader")
        if reason is None:
            reason = self.inadmissible(peer)
        self._log(peer, where, reason)
        return reason

    def inadmissible(self, peer: str) -> Optional[str]:
        """Why `peer` may not average at all (no valid binding), if so; bans aside."""
        return None if self.admit is None else self.admit(peer)

    def note_named(self, named: bool) -> None:
        """Whether a remote reducer named this peer this round (`named_this_peer`): others may then count its
        parts for nothing for as long as a ban of it could last (doubling with each offence, as bans do)."""
        if named:
            self.times_named += 1
            self.named_until = self.rounds + 1 + self.rule.ban_rounds * 2 ** min(self.times_named - 1, 10)

    def named_recently(self) -> bool:
        """Whether a ban of this peer by another member, on a reducer's word, may still last."""
        return self.rounds < self.named_until

    def ignore(self, peer: str) -> Optional[str]:
        """Why this peer's reducer counts `peer`'s parts for nothing in a group already formed, if it does:
        any ban, even on another reducer's word. A group is never failed for a ban: members' bans differ
        (each bans on what it saw), and failing would fork the swarm over one member's view."""
        reason = self.ban_reason(peer, heard=True)
        self._log(peer, "its parts", reason)
        return reason

    def _log(self, peer: str, where: str, reason: Optional[str]) -> None:
        logged = (peer, where, reason.split(" for ")[0] if reason else None)  # "banned for N more" counts down
        if reason is not None and logged not in self._logged:
            self._logged.add(logged)
            logger.warning("%s: refusing %s at %s: %s", self.name, peer, where, reason)

    def record(self, verdicts: dict[str, str], members: Iterable[str], own: Optional[dict[str, str]] = None,
               caught: Optional[dict[str, str]] = None, me: Optional[str] = None) -> None:
        """One all-reduce round ended; `verdicts` are the round's findings by sender (those of every reducer,
        adopted alike by every member), `own` those of this peer's reducer (default: `verdicts`), which
        the board's verdict reports and published bans carry: a peer signs only what it saw. `caught`: the
        reducers this peer caught lying, and how; `me`: this peer (never banned here)."""
        self.rounds += 1
        members, caught = list(members), {peer: why for peer, why in (caught or {}).items() if peer != me}
        own = verdicts if own is None else own
        self._report(own, members)
        for liar, why in caught.items():
            self._ban(liar, why)
        for peer in members:
            verdict = verdicts.get(peer)
            heard = own.get(peer) != verdict  # the finding is another reducer's, taken at its word
            if peer == me or peer in caught:
                continue
            if verdict == NON_FINITE:
                self._ban(peer, "sent non-finite values", heard)
            elif verdict == FAR_OFF and self.rule.ban_far_off:
                self._ban(peer, "sent values far beyond every other member's", heard)
            elif verdict == CLIPPED and self.rule.clip_strikes >= NEVER:
                logger.info("%s: %s's part was clipped (clipping alone never bans here)", self.name, peer)
            elif verdict == CLIPPED:
                self.strikes[peer] = self.strikes.get(peer, 0) + 1
                logger.warning("%s: %s's part was clipped (%d of %d strikes)", self.name, peer,
                               self.strikes[peer], self.rule.clip_strikes)
                if self.strikes[peer] >= self.rule.clip_strikes:
                    self._ban(peer, f"clipped in {self.strikes[peer]} consecutive rounds", heard)
            else:
                self.strikes.pop(peer, None)

    def _report(self, own: dict[str, str], members: list[str]) -> None:
        """Post this round's verdicts that the rule counts against a sender (the parameter averager's
        distances say nothing: a peer that missed a round is far off honestly)."""
        counted = {NON_FINITE: "sent non-finite values"}
        if self.rule.ban_far_off:
            counted[FAR_OFF] = "sent values far beyond every other member's"
        if self.rule.clip_strikes < NEVER:
            counted[CLIPPED] = f"clipped (a strike; {self.rule.clip_strikes} in a row ban)"
        found = {peer: (own[peer], f"{self.name} round {self.rounds}: {counted[own[peer]]}")
                 for peer in members if own.get(peer) in counted}
        if found and self.board is not None:
            post_verdicts(self.board, self.name, self.rounds, found)

    def _ban(self, peer: str, why: str, heard: bool = False) -> None:
        until = self.banned_until.get(peer)
        if heard and until is not None and self.rounds < until and peer not in self.hearsay:
            return  # already banned on this peer's own finding: hearsay changes nothing
        self.strikes.pop(peer, None)
        if heard:  # hearsay never escalates: a liar could make an honest peer's bans double
            rounds = self.rule.ban_rounds
        else:
            self.offences[peer] = self.offences.get(peer, 0) + 1
            rounds = self.rule.ban_rounds * 2 ** min(self.offences[peer] - 1, 10)  # a repeat offender waits longer
        self.banned_until[peer] = self.rounds + rounds
        if heard:
            why = f"{why} (another reducer's finding)"
            self.hearsay.add(peer)
        else:
            self.hearsay.discard(peer)
        if self.board is not None:
            try:  # the reason, for `swarm.ban_records` to publish (only what this peer saw itself)
                self._posted(peer, heard=not heard).unlink(missing_ok=True)
                self._posted(peer, heard).write_text(why)
            except OSError as exc:  # the ban still holds here
                logger.warning("%s: could not post the ban of %s for the other averagers: %s", self.name, peer, exc)
        self._logged = {entry for entry in self._logged if entry[0] != peer}
        logger.warning("%s: banning %s for %d rounds: %s", self.name, peer, rounds, why)
        if self.on_ban is not None:
            self.on_ban(peer, why)
