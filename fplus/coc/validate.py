"""`validate_coc`: check a CoC JSONL file line by line and, with a dataset, its coverage.

The file is streamed line by line with a line-size cap (`fplus.data.coc.line_cap_bytes`, from COC_MAX_TOKENS), so a
huge or binary file is rejected in bounded memory and time.

Errors (each with the line it is on; line 0 = the whole file):
    line_too_long    a line longer than the cap (its size is reported; the line is skipped unread)
    json             a line is not UTF-8 (or binary, UTF-16) or not valid JSON
    schema           not an object; both or neither of episode_index / episode_id; an unknown field; a wrong-typed
                     id or coc_text; a missing coc_text
    duplicate        an episode labelled again (the message names the line of the first label)
    empty            a blank coc_text
    too_long         a text longer than COC_MAX_TOKENS tokens of the backbone's tokenizer
    unknown_episode  (with a dataset) an episode index the dataset does not have
    no_labels        the file holds no valid label at all
    truncated        more than MAX_PROBLEMS (1000) problems: the rest are only counted
Warnings:
    coverage         (with a dataset) episodes without a label; an error with `require_full_coverage`
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fplus.coc.tokens import TokenCounter
from fplus.data.coc import CocProblem, read_coc

if TYPE_CHECKING:
    from fplus.data.lerobot import LeRobotDataset

ERROR_KINDS = ("line_too_long", "json", "schema", "duplicate", "empty", "too_long", "unknown_episode", "no_labels",
               "truncated")


def compact_ranges(values: list[int], max_ranges: int = 12) -> str:
    """Sorted ints as ranges, e.g. [0, 1, 2, 3, 7, 9, 10] -> "0-3, 7, 9-10"; long lists end in "... (+k more)"."""
    ranges: list[tuple[int, int]] = []
    for v in sorted(set(values)):
        if ranges and v == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], v)
        else:
            ranges.append((v, v))
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in ranges]
    if len(parts) > max_ranges:
        hidden = sum(b - a + 1 for a, b in ranges[max_ranges:])
        return ", ".join(parts[:max_ranges]) + f", ... (+{hidden} more)"
    return ", ".join(parts)


@dataclass(frozen=True)
class Coverage:
    """How many of a dataset's episodes have a label, and which do not."""

    dataset: str
    episodes: int
    labelled: int
    missing: list[int]

    @property
    def fraction(self) -> float:
        return self.labelled / self.episodes if self.episodes else 1.0


@dataclass(frozen=True)
class TokenStats:
    """Token counts of the valid texts: tokenizer used, whether exact, max / mean, the limit."""

    tokenizer: str
    exact: bool
    note: str
    limit: int
    max: int | None
    mean: float | None


@dataclass
class CocReport:
    """What `validate_coc` found: the valid labels' count, errors and warnings (line-sorted), tokens, coverage."""

    path: Path
    labels: int
    errors: list[CocProblem] = field(default_factory=list)
    warnings: list[CocProblem] = field(default_factory=list)
    tokens: TokenStats | None = None
    coverage: Coverage | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (what `fplus coc validate --json` prints)."""

        def problems(items: list[CocProblem]) -> list[dict[str, Any]]:
            return [{"line": p.line, "kind": p.kind, "message": p.message} for p in items]

        out: dict[str, Any] = {"file": str(self.path), "ok": self.ok, "labels": self.labels,
                               "errors": problems(self.errors), "warnings": problems(self.warnings)}
        if self.tokens is not None:
            t = self.tokens
            out["tokens"] = {"tokenizer": t.tokenizer, "exact": t.exact, "note": t.note, "limit": t.limit,
                             "max": t.max, "mean": None if t.mean is None else round(t.mean, 2)}
        if self.coverage is not None:
            c = self.coverage
            out["coverage"] = {"dataset": c.dataset, "episodes": c.episodes, "labelled": c.labelled,
                               "fraction": round(c.fraction, 4), "missing": c.missing,
                               "missing_compact": compact_ranges(c.missing)}
        return out


def validate_coc(
    path: Path,
    *,
    max_tokens: int,
    counter: TokenCounter | None,
    dataset: LeRobotDataset | None = None,
    require_full_coverage: bool = False,
) -> CocReport:
    """Check a CoC file (see the module docstring for the checks).

    Args:
        max_tokens: COC_MAX_TOKENS; a longer text is a `too_long` error (and it sets the line-size cap).
        counter: counts tokens (None skips the length check).
        dataset: when given, label episodes must exist in it and its coverage is reported.
        require_full_coverage: episodes without a label are an error instead of a warning.
    Raises FplusError only when the file does not exist or cannot be read.
    """
    coc = read_coc(Path(path), max_tokens=max_tokens)
    report = CocReport(path=Path(path), labels=len(coc.texts), errors=list(coc.problems))

    if counter is not None:
        counts = {episode: counter.count(text) for episode, text in coc.texts.items()}
        approx = "" if counter.exact else "~"
        for episode, n in counts.items():
            if n > max_tokens:
                report.errors.append(CocProblem(
                    coc.lines[episode], "too_long",
                    f"episode {episode}: coc_text has {approx}{n} tokens, more than COC_MAX_TOKENS={max_tokens}"
                    + ("" if counter.exact else " (approximate count)")))
        values = list(counts.values())
        report.tokens = TokenStats(tokenizer=counter.name, exact=counter.exact, note=counter.note, limit=max_tokens,
                                   max=max(values) if values else None,
                                   mean=sum(values) / len(values) if values else None)

    if dataset is not None:
        have = {e.index for e in dataset.episodes}
        span = compact_ranges(sorted(have), max_ranges=3)
        for episode in sorted(set(coc.texts) - have, key=lambda e: coc.lines[e]):
            report.errors.append(CocProblem(
                coc.lines[episode], "unknown_episode",
                f"episode {episode} is not in the dataset (its episodes: {span})"))
        labelled = have & set(coc.texts)
        missing = sorted(have - labelled)
        report.coverage = Coverage(dataset=str(dataset.root), episodes=len(have), labelled=len(labelled),
                                   missing=missing)
        if missing:
            problem = CocProblem(0, "coverage", f"{len(missing)} of {len(have)} dataset episodes have no label: "
                                                f"{compact_ranges(missing)}")
            (report.errors if require_full_coverage else report.warnings).append(problem)

    if not coc.texts:
        report.errors.append(CocProblem(0, "no_labels", "the file holds no valid label"))
    report.errors.sort(key=lambda p: (p.line == 0, p.line, ERROR_KINDS.index(p.kind) if p.kind in ERROR_KINDS else 99))
    return report


def render_report(report: CocReport) -> list[Any]:
    """Rich renderables: the problems table (when there are any) and a summary panel."""
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table

    out: list[Any] = []
    problems = [(p, "error") for p in report.errors] + [(p, "warning") for p in report.warnings]
    if problems:
        table = Table(title=f"{len(report.errors)} error(s), {len(report.warnings)} warning(s)", title_justify="left")
        table.add_column("line", justify="right")
        table.add_column("kind")
        table.add_column("problem", overflow="fold")
        for p, level in sorted(problems, key=lambda item: (item[0].line == 0, item[0].line)):
            style = "red" if level == "error" else "yellow"
            table.add_row(str(p.line) if p.line else "-", f"[{style}]{p.kind}", escape(p.message))
        out.append(table)

    lines = [f"[bold]{escape(str(report.path))}[/]", f"valid labels [bold]{report.labels}[/]"]
    t = report.tokens
    if t is not None:
        if t.max is not None:
            approx = "" if t.exact else "~"
            lines.append(f"tokens max {approx}{t.max} / mean {approx}{t.mean:.1f} (limit {t.limit}, "
                         f"tokenizer {escape(t.tokenizer)})")
        if not t.exact:
            lines.append(f"[yellow]token counts are approximate: {escape(t.note)}")
    else:
        lines.append("tokens not checked")
    c = report.coverage
    if c is not None:
        colour = "green" if not c.missing else "yellow"
        lines.append(f"coverage [{colour}]{c.labelled}/{c.episodes} episodes ({100 * c.fraction:.1f}%)[/] of "
                     f"{escape(c.dataset)}")
        if c.missing:
            lines.append(f"missing: {compact_ranges(c.missing)}")
    else:
        lines.append("coverage not checked (no dataset: pass --dataset or set DATASET)")
    verdict = "[bold green]OK" if report.ok else f"[bold red]{len(report.errors)} error(s)"
    lines.append(verdict)
    out.append(Panel("\n".join(lines), title="CoC labels", expand=False))
    return out
