"""State-dict key names: matching a checkpoint's names to a model's by suffix, and summarizing
long lists of names for the log."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

__all__ = ["align_by_suffix", "summarize_keys"]


def _suffix_match(a: str, b: str) -> bool:
    """True when one key ends with the other on a '.' boundary."""
    short, long = (a, b) if len(a) <= len(b) else (b, a)
    return long == short or long.endswith("." + short)


def align_by_suffix(
    model_keys: Iterable[str], ckpt_keys: Iterable[str]
) -> tuple[dict[str, str], list[tuple[str, list[str]]]]:
    """Match checkpoint keys to model keys when one ends with the other on a '.' boundary.

    The longest match (most dotted components in common) wins, exact names first. Returns
    `{model_key: ckpt_key}` and the ambiguous cases as `(key, [equally good candidates])`;
    ambiguous keys are left unmatched.
    """
    model_keys, ckpt_keys = list(model_keys), list(ckpt_keys)
    by_last: dict[str, list[str]] = defaultdict(list)
    for ck in ckpt_keys:
        by_last[ck.rsplit(".", 1)[-1]].append(ck)

    proposals: dict[str, tuple[str, int]] = {}
    ambiguous: list[tuple[str, list[str]]] = []
    for mk in model_keys:
        candidates = [ck for ck in by_last.get(mk.rsplit(".", 1)[-1], []) if _suffix_match(mk, ck)]
        if not candidates:
            continue
        scores = {ck: min(mk.count("."), ck.count(".")) + 1 + (ck == mk) for ck in candidates}
        best = max(scores.values())
        winners = [ck for ck, s in scores.items() if s == best]
        if len(winners) > 1:
            ambiguous.append((mk, sorted(winners)))
            continue
        proposals[mk] = (winners[0], best)

    # A checkpoint key may feed one model key: the best-scoring claim keeps it.
    claims: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for mk, (ck, score) in proposals.items():
        claims[ck].append((mk, score))
    matched: dict[str, str] = {}
    for ck, claimants in claims.items():
        best = max(score for _, score in claimants)
        winners = [mk for mk, score in claimants if score == best]
        if len(winners) > 1:
            ambiguous.append((ck, sorted(winners)))
        else:
            matched[winners[0]] = ck
    return matched, ambiguous


def summarize_keys(keys: Iterable[str], max_lines: int = 20) -> list[str]:
    """Readable lines for many parameter names, at most `max_lines` of them.

    Keys sharing everything up to their last '.' are shown as `prefix.{a, b}`. When that gives
    too many lines, keys are grouped by prefix as `prefix.* (N keys)`, starting from the first
    name component and splitting the largest groups further while the lines fit.
    """
    keys = sorted(set(keys))
    if not keys:
        return []
    # (prefix, whether the keys continue after it) -> last components; a key without a dot
    # is its own group, so `a` is not hidden by `a.b`
    leaf_groups: dict[tuple[str, bool], list[str]] = defaultdict(list)
    for key in keys:
        head, dot, tail = key.rpartition(".")
        leaf_groups[(head, True) if dot else (key, False)].extend([tail] if dot else [])
    if len(leaf_groups) <= max_lines:
        return [_leaf_group_line(head, tails) for (head, _), tails in leaf_groups.items()]

    split = [tuple(key.split(".")) for key in keys]
    groups: dict[tuple[str, ...], list[tuple[str, ...]]] = defaultdict(list)
    for parts in split:
        groups[parts[:1]].append(parts)
    frozen: set[tuple[str, ...]] = set()
    while True:
        expandable = [p for p, members in groups.items() if p not in frozen and len(members) > 1]
        if not expandable:
            break
        prefix = max(expandable, key=lambda p: len(groups[p]))
        children: dict[tuple[str, ...], list[tuple[str, ...]]] = defaultdict(list)
        for parts in groups[prefix]:
            children[parts[: len(prefix) + 1]].append(parts)
        if len(children) == 1 and next(iter(children)) != prefix:
            groups[next(iter(children))] = groups.pop(prefix)  # a longer common prefix
        elif len(groups) - 1 + len(children) <= max_lines and len(children) > 1:
            del groups[prefix]
            groups.update(children)
        else:
            frozen.add(prefix)
    lines = []
    for prefix in sorted(groups):
        members = groups[prefix]
        if len(members) == 1:
            lines.append(".".join(members[0]))
        else:
            lines.append(f"{'.'.join(prefix)}.* ({len(members)} keys)")
    if len(lines) > max_lines:  # only when the first components alone are too many
        rest = sum(len(groups[p]) for p in sorted(groups)[max_lines - 1 :])
        lines = [*lines[: max_lines - 1], f"... and {rest} more keys"]
    return lines


def _leaf_group_line(head: str, tails: list[str]) -> str:
    if not tails:
        return head
    if len(tails) == 1:
        return f"{head}.{tails[0]}"
    return f"{head}.{{{', '.join(tails)}}}"
