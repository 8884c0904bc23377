"""``bench locomo``'s report: the aims, markdown, JSON and the recall plot."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightmem.processors.llm import UsageTotals

if TYPE_CHECKING:
    pass

from lightmem.ops.bench.locomo.data import CATEGORIES, QuestionStats
from lightmem.ops.bench.locomo.recall import BUDGET_RULE, CONTENT_RULE, ratio
from lightmem.ops.bench.locomo.systems import BenchConfig, SystemResult, SystemSpec

#: The issue's aims: LightMem calls / per-turn calls, and the budget of the recall check.
AIM_CALLS_RATIO = 1 / 20


AIM_BUDGET = 512


#: Retrieval aims (issue 15): LightMem extractive R@10, and its content-aware recall at
#: :data:`AIM_BUDGET` words over NaiveRAG kNN's.
AIM_EXTRACTIVE_R10 = 0.62


AIM_CONTENT_MARGIN = 0.10


@dataclass
class BenchReport:
    """The whole run."""

    config: BenchConfig
    settings: dict[str, Any]
    llm: dict[str, Any]
    conversations: list[str]
    turns: int
    question_stats: QuestionStats
    systems: list[SystemResult]
    wall_s: float
    eval_llm: UsageTotals | None = None
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def ratios(self) -> list[dict[str, Any]]:
        """LightMem / per-turn, for calls and tokens, one row per LightMem LLM system (its
        build is shared by its retrieval modes: the first mode's result stands for it)."""
        base = next((s for s in self.systems if s.spec.kind == "per-turn"), None)
        if base is None:
            return []
        rows = []
        seen: set[SystemSpec] = set()
        for s in self.systems:
            if s.spec.kind != "lightmem" or s.spec in seen:
                continue
            seen.add(s.spec)
            b, m = base.llm, s.llm
            rows.append({
                "system": s.spec.name,
                "baseline": base.spec.name,
                "calls": ratio(m.calls, b.calls),
                "prompt_tokens": ratio(m.prompt_tokens, b.prompt_tokens),
                "completion_tokens": ratio(m.completion_tokens, b.completion_tokens),
                "total_tokens": ratio(m.prompt_tokens + m.completion_tokens,
                                       b.prompt_tokens + b.completion_tokens),
                "calls_baseline_over_lightmem": ratio(b.calls, m.calls),
            })
        return rows

    def aims(self) -> list[dict[str, Any]]:
        """The issue's aims, checked per LightMem LLM system against the baselines of this
        run: calls <= 1/20 of the per-turn extractor's, and recall at a 512-word budget >=
        NaiveRAG's (searched the same way). A check needs its baseline in the run (else
        None)."""
        base = next((s for s in self.systems if s.spec.kind == "per-turn"), None)
        rows = []
        for s in self.systems:
            if s.spec.kind != "lightmem":
                continue
            naive = next((n for n in self.systems
                          if n.spec.kind == "naive" and n.retrieval == s.retrieval), None)
            calls = ratio(s.llm.calls, base.llm.calls) if base else None
            recall, naive_recall = (s.recall_at_words.get(AIM_BUDGET),
                                    naive.recall_at_words.get(AIM_BUDGET) if naive else None)
            rows.append({
                "system": s.spec.name, "retrieval": s.variant, "th": s.spec.th,
                "rate": s.spec.rate,
                "calls_over_per_turn": calls,
                "calls_met": None if calls is None else calls <= AIM_CALLS_RATIO,
                f"recall_at_{AIM_BUDGET}w": recall,
                f"naive_recall_at_{AIM_BUDGET}w": naive_recall,
                "recall_met": (None if recall is None or naive_recall is None
                               else recall >= naive_recall),
            })
        return rows

    def retrieval_aims(self) -> list[dict[str, Any]]:
        """Issue 15's aims, per LightMem extractive result: R@10 >= 0.62, and content-aware
        recall at 512 words >= NaiveRAG kNN's + 0.10 (None without NaiveRAG kNN in the run)."""
        naive = next((n for n in self.systems
                      if n.spec.kind == "naive" and n.retrieval == "knn"), None)
        base = None if naive is None else naive.content_recall_at_words.get(AIM_BUDGET)
        rows = []
        for s in self.systems:
            if s.spec.kind != "extractive":
                continue
            r10 = s.recall_at_k.get(10)
            content = s.content_recall_at_words.get(AIM_BUDGET)
            rows.append({
                "system": s.spec.name, "retrieval": s.variant,
                "recall_at_10": r10,
                "recall_at_10_met": None if r10 is None else r10 >= AIM_EXTRACTIVE_R10,
                f"content_recall_at_{AIM_BUDGET}w": content,
                f"naive_knn_content_recall_at_{AIM_BUDGET}w": base,
                "content_met": (None if content is None or base is None
                                else content >= base + AIM_CONTENT_MARGIN),
            })
        return rows

    def as_json(self) -> dict[str, Any]:
        c = self.config
        return {
            "benchmark": "locomo",
            "created": self.created,
            "data": str(c.data),
            "conversations": self.conversations,
            "turns": self.turns,
            "questions": asdict(self.question_stats),
            "categories": CATEGORIES,
            "llm": self.llm,
            "settings": self.settings,
            "ks": list(c.ks),
            "budgets_words": list(c.budgets),
            "budget_rule": BUDGET_RULE,
            "content_rule": CONTENT_RULE,
            "retrieval": list(c.retrieval),
            "recall": (
                "evidence recall: |evidence turns ∩ source turns of the retrieved entries| / "
                "|evidence turns|, averaged over questions (turn level); session recall: the "
                "same over the evidence turns' sessions"
            ),
            "systems": [s.as_json() for s in self.systems],
            "ratios_lightmem_over_per_turn": self.ratios(),
            "aims": self.aims(),
            "retrieval_aims": self.retrieval_aims(),
            "eval_llm_usage": None if self.eval_llm is None else vars(self.eval_llm),
            "wall_s": round(self.wall_s, 2),
        }


def met(ok: bool | None) -> str:
    return "n/a (baseline not run)" if ok is None else ("met" if ok else "**not met**")


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None or value != value:  # None or NaN
        return "–"
    return f"{value:.{digits}f}"


def render_markdown(report: BenchReport) -> str:
    """The report as markdown: quality, cost, phase times, ratios, sweep."""
    c = report.config
    q = report.question_stats
    lines = [
        "# LightMem on LoCoMo: evidence recall and memory-building cost",
        "",
        f"- data: `{c.data}`; conversations: {', '.join(report.conversations)} "
        f"({report.turns} turns); questions (categories 1-4): {q.selected} "
        f"(skipped: {q.no_evidence} without evidence, {q.beyond_turn_limit} beyond the turn "
        f"limit; {q.unknown_evidence_ids} unknown evidence ids dropped)",
        f"- LLM: {report.llm['source']}"
        + (f" (`{report.llm['model']}` at {report.llm['base_url']})"
           if report.llm["source"] != "none" else ""),
    ]
    if report.llm.get("note"):
        lines.append(f"- **STUB LLM**: {report.llm['note']}")
    s = report.settings
    lines += [
        f"- compressor: {s['compressor']} (loaded: "
        f"{', '.join(s['compressor_backend_loaded']) or 'not used'}); "
        f"embedder: {s['embedder']}; store: {s['store']}",
        f"- per-turn baseline: {s['per_turn_unit_meaning']}; turns not pre-compressed",
        "- R@k: evidence recall at k entries, turn level (fraction of a question's evidence "
        "turns that the best k entries' own source turns cover), mean over questions; "
        "sR@k: the same at session level (a hit counts for its session)",
        f"- word budgets: {BUDGET_RULE}",
        f"- C@Nw: content-aware credit at N words: {CONTENT_RULE}; R@Nw: the old whole-turn "
        "credit (a line citing a turn earns all of it), kept beside it for one release",
        f"- retrieval: {', '.join(c.retrieval)} (knn: vector only; hybrid: kNN + BM25, "
        "reciprocal rank fusion); memory is built once per system and searched each way",
        f"- extractive memories: the index embeds {' / '.join(c.embed_texts)} text (one build "
        f"each: 'embeds ...'), the lines show {' / '.join(c.render_texts)} text ('shows ...'; "
        "compressed: the memory's fact, original: its source turn as said)",
        f"- topic context: {', '.join(map(str, c.topic_context))} memories of the hit's topic "
        f"segment after each of the best {c.context_hits} hits ('ctx NxH'; LightMem systems; "
        "charged at a budget, credited like any line there, no credit at k)",
        "- search ms: one search per question at the largest k, store + fusion (queries "
        "embedded beforehand, one batch per conversation), single caller",
        f"- run wall time: {report.wall_s:.1f} s",
        "",
        "## Retrieval quality",
        "",
    ]
    big = max(c.ks)
    head = (["system", "retrieval"] + [f"R@{k}" for k in c.ks] + [f"sR@{k}" for k in c.ks]
            + [f"C@{AIM_BUDGET}w", f"R@{AIM_BUDGET}w", "search ms p50", "p95"])
    if c.answer:
        head.append("answer acc.")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report.systems:
        row = [r.spec.name, r.variant] + [fmt(r.recall_at_k.get(k)) for k in c.ks]
        row += [fmt(r.session_recall_at_k.get(k)) for k in c.ks]
        row += [fmt(r.content_recall_at_words.get(AIM_BUDGET)),
                fmt(r.recall_at_words.get(AIM_BUDGET)),
                fmt(r.search_ms.get("p50"), 1), fmt(r.search_ms.get("p95"), 1)]
        if c.answer:
            row.append(fmt(r.answer.as_json()["accuracy"]) if r.answer else "–")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"(search latency measured at k = {big})", "",
              "## Recall at word budgets: content-aware (C) beside whole-turn (R)", ""]
    head = (["system", "retrieval"] + [f"C@{w}w" for w in c.budgets]
            + [f"R@{w}w" for w in c.budgets])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report.systems:
        row = [r.spec.name, r.variant]
        row += [fmt(r.content_recall_at_words.get(w)) for w in c.budgets]
        row += [fmt(r.recall_at_words.get(w)) for w in c.budgets]
        lines.append("| " + " | ".join(row) + " |")
    raims = report.retrieval_aims()
    if raims:
        lines += ["", "## Retrieval aims (issue 15)", "",
                  f"LightMem extractive R@10 >= {AIM_EXTRACTIVE_R10}, and its content-aware "
                  f"recall at {AIM_BUDGET} words >= NaiveRAG kNN's + {AIM_CONTENT_MARGIN}:", ""]
        head = ["system", "retrieval", "R@10", "R@10 aim", f"C@{AIM_BUDGET}w",
                f"NaiveRAG kNN C@{AIM_BUDGET}w", "content aim"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for a in raims:
            lines.append(
                f"| {a['system']} | {a['retrieval']} | {fmt(a['recall_at_10'])} | "
                f"{met(a['recall_at_10_met'])} | {fmt(a[f'content_recall_at_{AIM_BUDGET}w'])} | "
                f"{fmt(a[f'naive_knn_content_recall_at_{AIM_BUDGET}w'])} | "
                f"{met(a['content_met'])} |")
    lines += ["", "## Memory-building cost", ""]
    head = ["system", "entries", "words stored", "LLM calls", "prompt tok", "completion tok",
            "dead letters"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    built = list({r.spec: r for r in reversed(report.systems)}.values())[::-1]
    for r in built:
        lines.append(
            f"| {r.spec.name} | {r.entries} | {r.words_stored} | {r.llm.calls} | "
            f"{r.llm.prompt_tokens} | {r.llm.completion_tokens} | {r.dead_letters} |"
        )
    lines += ["", "## Wall time per phase (seconds)", ""]
    head = ["system", "compress", "segment", "summarize/extract", "embed+index",
            "other ingest", "build total", "retrieve (all questions)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report.systems:
        st = r.phases_s

        def cell(phase: str, r: SystemResult = r, st: dict[str, float] = st) -> str:
            mark = "*" if phase in r.shared_phases else ""
            return f"{st.get(phase, 0.0):.2f}{mark}"

        lines.append(
            f"| {r.name} | {cell('compress')} | {cell('segment')} | {cell('summarize')} | "
            f"{cell('embed_index')} | {cell('ingest_other')} | {r.build_wall_s:.2f} | "
            f"{cell('retrieve')} |"
        )
    if any(r.shared_phases for r in report.systems):
        lines += [
            "",
            "\\* computed once per compression rate and reused by this system; the time "
            "shown is what it cost when computed (build total is this system's measured "
            "wall time, so it excludes the reused work)",
        ]
    ratios = report.ratios()
    if ratios:
        lines += ["", "## LightMem / per-turn extractor", ""]
        head = ["system", "calls", "prompt tokens", "completion tokens", "total tokens",
                "per-turn calls per LightMem call"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in ratios:
            lines.append(
                f"| {row['system']} | {fmt(row['calls'], 4)} | {fmt(row['prompt_tokens'], 4)} | "
                f"{fmt(row['completion_tokens'], 4)} | {fmt(row['total_tokens'], 4)} | "
                f"{fmt(row['calls_baseline_over_lightmem'], 1)} |"
            )
    aims = report.aims()
    if aims:
        lines += ["", "## Aims", "",
                  f"LightMem's LLM calls <= 1/{round(1 / AIM_CALLS_RATIO)} of the per-turn "
                  f"extractor's, and its recall at {AIM_BUDGET} words >= NaiveRAG's, in this run:",
                  ""]
        head = ["system", "calls / per-turn", "calls aim", f"R@{AIM_BUDGET}w",
                f"NaiveRAG R@{AIM_BUDGET}w", "recall aim"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for a in aims:
            lines.append(
                f"| {a['system']} [{a['retrieval']}] | {fmt(a['calls_over_per_turn'], 4)} | "
                f"{met(a['calls_met'])} "
                f"| {fmt(a[f'recall_at_{AIM_BUDGET}w'])} | "
                f"{fmt(a[f'naive_recall_at_{AIM_BUDGET}w'])} | {met(a['recall_met'])} |")
    sweep = [r for r in report.systems if r.spec.kind == "lightmem"]
    if sweep:
        lines += ["", "## LightMem sweep (paper's table shape)", ""]
        head = ["r", "th", "retrieval", "R@10", "C@512w", "R@512w", "LLM calls", "prompt tok",
                "completion tok", "summarize s", "build s"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in sweep:
            lines.append(
                f"| {r.spec.rate:g} | {r.spec.th} | {r.variant} | {fmt(r.recall_at_k.get(10))} | "
                f"{fmt(r.content_recall_at_words.get(512))} | "
                f"{fmt(r.recall_at_words.get(512))} | {r.llm.calls} | {r.llm.prompt_tokens} | "
                f"{r.llm.completion_tokens} | {r.phases_s.get('summarize', 0.0):.2f} | "
                f"{r.build_wall_s:.2f} |"
            )
    cats = [label for label in CATEGORIES.values()
            if any(label in r.by_category for r in report.systems)]
    if cats:
        w = 512 if 512 in c.budgets else c.budgets[0]
        lines += ["", f"## Content-aware recall at {w} words by category", ""]
        head = ["system"] + [
            f"{label} ({report.systems[0].by_category.get(label, {}).get('questions', 0):.0f})"
            for label in cats
        ]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in report.systems:
            row = [r.name] + [fmt(r.by_category.get(label, {}).get(f"c@{w}"))
                              for label in cats]
            lines.append("| " + " | ".join(row) + " |")
    if report.eval_llm is not None:
        u = report.eval_llm
        lines += ["", f"Answer mode (answering + judging, not memory cost): {u.calls} calls, "
                  f"{u.prompt_tokens} prompt / {u.completion_tokens} completion tokens."]
    return "\n".join(lines) + "\n"


def plot_recall(report: BenchReport, path: Path) -> bool:
    """PNG: recall@k and recall at word budgets, one line per system. False when
    matplotlib is not installed (a dev extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    c = report.config
    fig, (ax_k, ax_w) = plt.subplots(1, 2, figsize=(11, 4.5))
    for r in report.systems:
        ax_k.plot(c.ks, [r.recall_at_k[k] for k in c.ks], marker="o", label=r.name)
        ax_w.plot(c.budgets, [r.content_recall_at_words[w] for w in c.budgets], marker="o",
                  label=r.name)
    ax_k.set(xlabel="k (entries retrieved)", ylabel="evidence recall", title="recall@k",
             xticks=list(c.ks), ylim=(0, 1))
    ax_w.set(xlabel="retrieved-context budget (words)", ylabel="content-aware recall",
             title="content-aware recall at equal context budget", xscale="log", ylim=(0, 1))
    ax_w.set_xticks(list(c.budgets), [str(w) for w in c.budgets])
    ax_w.minorticks_off()
    for ax in (ax_k, ax_w):
        ax.grid(alpha=0.3)
    ax_w.legend(fontsize=8, loc="lower right")
    title = (
        f"LoCoMo ({len(report.conversations)} conversation"
        f"{'s' if len(report.conversations) != 1 else ''}, "
        f"{report.question_stats.selected} questions)"
    )
    if report.llm["source"] == "stub":
        title += " - LLM systems on the STUB LLM"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(report: BenchReport, out: Path) -> dict[str, Path]:
    """Write ``locomo.md``, ``locomo.json`` and ``locomo_recall.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "locomo.md", "json": out / "locomo.json"}
    paths["markdown"].write_text(render_markdown(report))
    paths["json"].write_text(json.dumps(report.as_json(), indent=2, ensure_ascii=False) + "\n")
    png = out / "locomo_recall.png"
    if plot_recall(report, png):
        paths["plot"] = png
    return paths

