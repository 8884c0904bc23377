"""``lightmem bench locomo``: the recall metrics on hand-made hits with known answers, the
evidence/question selection, the per-turn units, answer-mode judging, the refusal to answer
with the stub, and one real CLI run on a tiny LoCoMo slice (models)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from lightmem.ops.bench.llm_stub import (
    OpenAIStubServer,
    StubReply,
    fact_extraction_responder,
    scripted_responder,
)
from lightmem.ops.bench.locomo import (
    BenchConfig,
    Question,
    Retrieved,
    SystemResult,
    SystemSpec,
    content_recall,
    content_recall_at_budget,
    evidence_recall,
    judge_answer,
    parse_evidence,
    parse_verdict,
    recall_at_budget,
    recall_at_k,
    run_locomo_bench,
    select_questions,
    session_of,
    session_recall,
    session_recall_at_k,
    top_k,
    unit_segments,
    within_budget,
)
from lightmem.ops.bench.locomo_data import LocomoSample, load_locomo
from lightmem.ops.cli import app
from lightmem.processors.lexical import content_words
from lightmem.processors.llm import UsageTotals
from lightmem.processors.store import ScoredEntry
from lightmem.schemas import MemoryEntry, Role, TurnEvent
from lightmem.settings import load_settings
from lightmem.streams.models.openai_chat import OpenAIChatModel


def hit(*turns: str, words: int) -> Retrieved:
    return Retrieved(frozenset(turns), words)


# Best first. Evidence of the question below: D1:1, D2:5, D3:7.
HITS = [
    hit("D1:1", words=100),  # evidence
    hit("D9:9", words=50),
    hit("D2:5", "D2:6", words=300),  # evidence (an entry drawn from two turns)
    hit("D1:1", words=10),  # evidence again: no extra credit
    hit("D3:7", words=20),  # evidence
]
EVIDENCE = ("D1:1", "D2:5", "D3:7")


# -- recall -------------------------------------------------------------------------------


def test_evidence_recall_counts_each_evidence_turn_once() -> None:
    assert evidence_recall(EVIDENCE, []) == 0.0
    assert evidence_recall(EVIDENCE, HITS[:1]) == pytest.approx(1 / 3)
    assert evidence_recall(EVIDENCE, HITS[:4]) == pytest.approx(2 / 3)
    assert evidence_recall(EVIDENCE, HITS) == 1.0
    # Duplicate evidence ids count once.
    assert evidence_recall(("D1:1", "D1:1"), HITS[:1]) == 1.0
    with pytest.raises(ValueError, match="evidence"):
        evidence_recall((), HITS)


@pytest.mark.parametrize(("k", "expected"), [(1, 1 / 3), (2, 1 / 3), (3, 2 / 3), (4, 2 / 3),
                                             (5, 1.0), (20, 1.0)])
def test_recall_at_k(k: int, expected: float) -> None:
    assert recall_at_k(EVIDENCE, HITS, k) == pytest.approx(expected)
    assert len(top_k(HITS, k)) == min(k, len(HITS))


@pytest.mark.parametrize(
    ("words", "taken", "expected"),
    [
        (99, 0, 0.0),  # the best hit alone crosses the budget: nothing fits
        (100, 1, 1 / 3),  # exact fit is included
        (149, 1, 1 / 3),
        (150, 2, 1 / 3),
        # 150 + 300 crosses: hit 3 is excluded and the scan stops, even though the later
        # 10- and 20-word hits would fit (the rule is a prefix of the ranking).
        (449, 2, 1 / 3),
        (450, 3, 2 / 3),
        (479, 4, 2 / 3),
        (480, 5, 1.0),
        (2048, 5, 1.0),
    ],
)
def test_recall_at_budget_takes_a_prefix_that_fits(words: int, taken: int,
                                                   expected: float) -> None:
    assert within_budget(HITS, words) == HITS[:taken]
    assert recall_at_budget(EVIDENCE, HITS, words) == pytest.approx(expected)


def test_bad_k_and_budget_are_rejected() -> None:
    with pytest.raises(ValueError, match="k"):
        top_k(HITS, 0)
    with pytest.raises(ValueError, match="words"):
        within_budget(HITS, 0)


def test_topic_context_lines_earn_nothing_at_k() -> None:
    context = Retrieved(frozenset({"D2:5"}), 10, context=True)
    hits = [HITS[0], context, HITS[1]]
    assert top_k(hits, 2) == [HITS[0], HITS[1]]
    assert recall_at_k(EVIDENCE, hits, 3) == pytest.approx(1 / 3)
    # At a budget the context line is charged and credited like any line it takes.
    assert recall_at_budget(EVIDENCE, hits, 110) == pytest.approx(2 / 3)


def test_session_recall_counts_a_hit_for_its_session() -> None:
    assert session_of("D12:7") == "D12"
    evidence = ("D1:1", "D1:2", "D3:7")  # sessions D1 and D3
    near_miss = [hit("D1:9", words=5)]  # same session as two evidence turns, not them
    assert evidence_recall(evidence, near_miss) == 0.0
    assert session_recall(evidence, near_miss) == 0.5
    assert session_recall(evidence, near_miss + [hit("D3:1", words=5)]) == 1.0
    assert session_recall_at_k(evidence, near_miss + [hit("D3:1", words=5)], 1) == 0.5
    with pytest.raises(ValueError, match="evidence"):
        session_recall((), near_miss)


TURN = "I adopted a beagle puppy called Biscuit from the shelter in Porto last week"


def _line(turn_id: str, fact: str) -> Retrieved:
    entry = MemoryEntry(
        id=f"m-{turn_id}-{len(fact)}", tenant="t", user="u", conversation="c", topic_id="s",
        speaker="Ann", fact=fact, event_time=datetime(2023, 5, 8, 13, 56, tzinfo=UTC),
        ingest_time=datetime(2023, 5, 9, tzinfo=UTC), source_turn_ids=[turn_id],
        original_text=TURN, compressed_text=fact, mode="extractive")
    return Retrieved.from_hit(ScoredEntry(entry, 1.0))


def test_content_credit_a_compressed_line_that_lost_the_answer_earns_less() -> None:
    words = content_words(TURN)
    assert words == {"adopted", "beagle", "puppy", "called", "biscuit", "shelter", "porto",
                     "last", "week"}
    evidence, evidence_words = ("D1:3",), (frozenset(words),)
    full = _line("D1:3", f"Ann: {TURN}")
    kept = _line("D1:3", "Ann: adopted beagle puppy called Biscuit shelter Porto")
    lost = _line("D1:3", "Ann: adopted puppy from shelter last week")  # the name is gone
    # The rendered line is charged, date prefix included: "[2023-05-08, Monday] Ann: ...".
    assert full.words == len(TURN.split()) + 3
    # Whole-turn credit cannot tell them apart; content-aware credit can.
    for line in (full, kept, lost):
        assert evidence_recall(evidence, [line]) == 1.0
    assert content_recall(evidence, evidence_words, [full]) == 1.0
    assert content_recall(evidence, evidence_words, [kept]) == pytest.approx(7 / 9)
    assert content_recall(evidence, evidence_words, [lost]) == pytest.approx(5 / 9)
    assert "biscuit" not in lost.content
    # Words said by a line citing ANOTHER turn earn nothing for this one.
    other = _line("D1:4", f"Ann: {TURN}")
    assert content_recall(evidence, evidence_words, [lost, other]) == pytest.approx(5 / 9)
    # Two lines citing the turn pool what they say.
    rest = _line("D1:3", "Ann: Biscuit beagle called Porto")
    assert content_recall(evidence, evidence_words, [lost, rest]) == 1.0


def test_content_credit_averages_over_evidence_turns_and_falls_back() -> None:
    a, b = _line("D1:1", f"Ann: {TURN}"), _line("D2:2", "Ann: beagle")
    words = frozenset(content_words(TURN))
    assert content_recall(("D1:1", "D2:2"), (words, words), [a, b]) == pytest.approx(
        (1 + 1 / 9) / 2)
    assert content_recall(("D1:1", "D3:3"), (words, words), [a]) == 0.5
    # A turn with no content words ("ok!") earns 1 when cited, 0 when not.
    assert content_recall(("D2:2",), (frozenset(),), [b]) == 1.0
    assert content_recall(("D2:9",), (frozenset(),), [b]) == 0.0
    # Without evidence words: whole-turn credit.
    assert content_recall(("D2:2",), (), [b]) == 1.0
    with pytest.raises(ValueError, match="evidence_words"):
        content_recall(("D1:1", "D2:2"), (words,), [a])


def test_content_recall_at_budget_charges_rendered_lines() -> None:
    q = Question("c", "Who is Biscuit?", "a beagle", 4, ("D1:3",),
                 (frozenset(content_words(TURN)),))
    full = _line("D1:3", f"Ann: {TURN}")
    assert content_recall_at_budget(q, [full], full.words) == 1.0
    assert content_recall_at_budget(q, [full], full.words - 1) == 0.0


# -- evidence and question selection ----------------------------------------------------------


def test_parse_evidence_normalises_locomo_quirks() -> None:
    assert parse_evidence(["D8:6; D9:17", "D:11:26", "D", "D1:03", "D8:6"]) == [
        "D8:6", "D9:17", "D11:26", "D1:3"
    ]
    assert parse_evidence([]) == []


def _turns(n: int, *, sessions: int = 1) -> list[TurnEvent]:
    start = datetime(2023, 5, 8, 13, 56, tzinfo=UTC)
    per = -(-n // sessions)
    events = []
    for i in range(n):
        s = i // per + 1
        role = Role.user if i % 2 == 0 else Role.assistant
        events.append(TurnEvent(
            tenant="locomo", user="c1", conversation="c1", session=f"session_{s}",
            turn_id=f"D{s}:{i % per + 1}", role=role,
            speaker="Ann" if role is Role.user else "Bob", text=f"turn number {i}",
            event_time=start + timedelta(days=s, seconds=30 * i),
        ))
    return events


def test_select_questions_drops_unknown_ids_and_limits() -> None:
    qa = [
        {"question": "a?", "answer": "x", "evidence": ["D1:1"], "category": 4},
        {"question": "b?", "answer": 2022, "evidence": ["D1:2; D1:99"], "category": 2},
        {"question": "c?", "answer": "x", "evidence": ["D1:99"], "category": 1},
        {"question": "d?", "adversarial_answer": "x", "evidence": ["D1:1"], "category": 5},
        {"question": "e?", "answer": "x", "evidence": ["D1:5"], "category": 3},
        {"question": "f?", "answer": "x", "evidence": [], "category": 3},
    ]
    turns = _turns(6)
    sample = LocomoSample("c1", turns, qa)
    ids = [t.turn_id for t in turns]
    qs, stats = select_questions(sample, all_turn_ids=ids, kept_turn_ids=ids[:4])
    assert [(q.question, q.evidence, q.answer) for q in qs] == [
        ("a?", ("D1:1",), "x"), ("b?", ("D1:2",), "2022")
    ]
    assert stats.total == 6 and stats.other_category == 1
    assert stats.unknown_evidence_ids == 2  # D1:99 twice
    assert stats.no_evidence == 2  # c? (only an unknown id) and f?
    assert stats.beyond_turn_limit == 1  # e? needs D1:5, beyond the first 4 turns
    assert stats.selected == 2
    # Each evidence turn's content words, for the content-aware credit.
    assert qs[1].evidence_words == (frozenset({"turn", "number", "1"}),)
    limited, _ = select_questions(sample, all_turn_ids=ids, limit=1)
    assert [q.question for q in limited] == ["a?"]


def testunit_segments_one_call_per_user_turn_or_per_turn() -> None:
    turns = _turns(8, sessions=2)  # u a u a | u a u a
    sample = LocomoSample("c1", turns, [])
    exchanges = unit_segments(sample, "exchange", tag="t")
    assert [[t.turn_id for t in s.turns] for s in exchanges] == [
        ["D1:1", "D1:2"], ["D1:3", "D1:4"], ["D2:1", "D2:2"], ["D2:3", "D2:4"]
    ]
    assert [s.session for s in exchanges] == ["session_1"] * 2 + ["session_2"] * 2
    singles = unit_segments(sample, "turn", tag="t")
    assert [len(s.turns) for s in singles] == [1] * 8
    assert len({s.segment_id for s in singles}) == 8
    # Not compressed: the prompt carries the original text.
    assert all(t.compressed_text == t.original_text for s in singles for t in s.turns)


def test_exchanges_make_one_call_per_user_turn_when_a_session_opens_with_the_other() -> None:
    turns = _turns(8, sessions=2)
    # Session 2 opens with Bob: a a u a (its first turn's role flipped).
    flipped = [t.model_copy(update={"role": Role.assistant, "speaker": "Bob"})
               if t.turn_id == "D2:1" else t for t in turns]
    sample = LocomoSample("c1", flipped, [])
    exchanges = unit_segments(sample, "exchange", tag="t")
    assert len(exchanges) == sum(t.role is Role.user for t in flipped) == 3
    assert [[t.turn_id for t in s.turns] for s in exchanges] == [
        ["D1:1", "D1:2"], ["D1:3", "D1:4"], ["D2:1", "D2:2", "D2:3", "D2:4"]]


# -- answer mode ----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "verdict"), [
    ("CORRECT", True), ("correct.", True), ("WRONG", False), ("INCORRECT", False),
    ("The answer is WRONG, not CORRECT", False), ("maybe", None),
])
def test_parse_verdict(text: str, verdict: bool | None) -> None:
    assert parse_verdict(text) is verdict


def test_judge_answer_is_one_metered_call() -> None:
    question = Question("c1", "When did Ann move?", "May 2023", 2, ("D1:1",))
    with OpenAIStubServer(scripted_responder(["CORRECT", "WRONG"])) as server:
        chat = OpenAIChatModel(server.base_url, "stub", "", max_retries=0)
        assert judge_answer(chat, question, "In May 2023.", tenant="locomo") is True
        assert judge_answer(chat, question, "I don't know.", tenant="locomo") is False
        prompts = [r["messages"][-1]["content"] for r in server.chat_requests]
    assert "Gold answer: May 2023" in prompts[0] and "Generated answer: In May 2023." in prompts[0]
    assert chat.meter.total(purpose="judge").calls == 2


def test_ratios_lightmem_over_per_turn() -> None:
    from lightmem.ops.bench.locomo import BenchReport, QuestionStats

    def result(spec: SystemSpec, calls: int, prompt: int, completion: int) -> SystemResult:
        return SystemResult(spec, llm=UsageTotals(calls=calls, prompt_tokens=prompt,
                                                  completion_tokens=completion))

    report = BenchReport(
        config=BenchConfig(), settings={}, llm={}, conversations=[], turns=0,
        question_stats=QuestionStats(), wall_s=0.0,
        systems=[result(SystemSpec("naive"), 0, 0, 0),
                 result(SystemSpec("lightmem", rate=0.6, th=512), 5, 1000, 500),
                 result(SystemSpec("per-turn"), 100, 4000, 1000)],
    )
    [row] = report.ratios()
    assert row["system"] == "LightMem r=0.6 th=512"
    assert row["calls"] == 0.05 and row["prompt_tokens"] == 0.25
    assert row["completion_tokens"] == 0.5 and row["total_tokens"] == 0.3
    assert row["calls_baseline_over_lightmem"] == 20.0


def test_aims_are_checked_against_the_baselines_of_the_run() -> None:
    from lightmem.ops.bench.locomo import BenchReport, QuestionStats

    def result(spec: SystemSpec, calls: int, r512: float) -> SystemResult:
        return SystemResult(spec, llm=UsageTotals(calls=calls), recall_at_words={512: r512})

    def report(*systems: SystemResult) -> BenchReport:
        return BenchReport(config=BenchConfig(), settings={}, llm={}, conversations=[],
                           turns=0, question_stats=QuestionStats(), wall_s=0.0,
                           systems=list(systems))

    naive = result(SystemSpec("naive"), 0, 0.586)
    per_turn = result(SystemSpec("per-turn"), 2153, 0.598)
    small = result(SystemSpec("lightmem", rate=0.6, th=512), 219, 0.633)
    large = result(SystemSpec("lightmem", rate=0.6, th=1280), 84, 0.580)
    rows = report(naive, small, large, per_turn).aims()
    assert [(r["th"], r["calls_met"], r["recall_met"]) for r in rows] == [
        (512, False, True), (1280, True, False)]
    assert rows[1]["calls_over_per_turn"] == round(84 / 2153, 4)
    # Exactly 1/20 meets it; without the baselines nothing is claimed.
    [edge] = report(result(SystemSpec("lightmem", rate=0.6, th=512), 5, 0.5),
                    result(SystemSpec("per-turn"), 100, 0.5)).aims()
    assert (edge["calls_met"], edge["recall_met"]) == (True, None)


def test_answer_mode_refuses_without_a_real_endpoint(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIGHTMEM_LLM_BASE_URL", raising=False)
    result = CliRunner().invoke(app, ["bench", "locomo", "--answer", "--data",
                                      str(tmp_path / "absent.json"), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "refused" in result.output and "LIGHTMEM_LLM_BASE_URL" in result.output
    assert not (tmp_path / "locomo.json").exists()


# -- real runs (models) ---------------------------------------------------------------------


def _user_exchanges(turns: list[TurnEvent]) -> int:
    """Calls the per-turn baseline should make: exactly one per user turn (a session that
    opens with the assistant adds none)."""
    return sum(t.role is Role.user for t in turns)


@pytest.mark.models
def test_cli_run_on_a_tiny_slice(locomo_path: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIGHTMEM_LLM_BASE_URL", raising=False)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "bench", "locomo", "--data", str(locomo_path), "--out", str(out),
        "--limit-conversations", "1", "--limit-turns", "40",
        "--render-text", "original,compressed",
    ])
    assert result.exit_code == 0, result.output
    assert "STUB" in result.output
    report = json.loads((out / "locomo.json").read_text())
    assert (out / "locomo_recall.png").stat().st_size > 0
    assert "STUB LLM" in (out / "locomo.md").read_text()
    assert report["llm"]["source"] == "stub" and report["turns"] == 40
    assert report["questions"]["selected"] > 0
    # Every system searched both ways (memory built once): kNN and hybrid side by side; the
    # extractive system's hits scored as each text shown (original first, as asked).
    assert [(s["kind"], s["retrieval"], s["render_text"]) for s in report["systems"]] == [
        (kind, mode, shown) for kind in ("naive", "extractive", "lightmem", "per-turn")
        for mode in ("knn", "hybrid")
        for shown in (("original", "compressed") if kind == "extractive" else (None,))]
    both = {(s["kind"], s["retrieval"]): s for s in report["systems"]}
    for kind in ("naive", "extractive", "lightmem", "per-turn"):
        knn, hybrid = both[(kind, "knn")], both[(kind, "hybrid")]
        assert knn["entries"] == hybrid["entries"] and knn["llm_calls"] == hybrid["llm_calls"]
        assert knn["search_ms"]["p50"] > 0 and hybrid["search_ms"]["p95"] > 0
    # (the extractive system: the compressed lines, the last knn variant)
    systems = {s["kind"]: s for s in report["systems"] if s["retrieval"] == "knn"}
    shows_original = next(s for s in report["systems"]
                          if s["kind"] == "extractive" and s["render_text"] == "original")
    assert systems["extractive"]["render_text"] == "compressed"
    assert systems["extractive"]["embed_text"] == shows_original["embed_text"] == "original"

    # Expected counts from the data itself.
    turns = load_locomo(locomo_path, limit=1)[0].turns[:40]
    assert systems["naive"]["entries"] == 40  # one entry per turn: "speaker: text"
    assert systems["naive"]["words_stored"] == sum(len(f"{t.speaker}: {t.text}".split())
                                                   for t in turns)
    assert systems["extractive"]["entries"] == 40  # one compressed turn per turn
    assert systems["extractive"]["words_stored"] < systems["naive"]["words_stored"]
    assert systems["naive"]["llm_calls"] == systems["extractive"]["llm_calls"] == 0
    # The per-turn baseline makes one call per user turn (exchange), LightMem far fewer.
    assert systems["per-turn"]["llm_calls"] == _user_exchanges(turns)
    assert 0 < systems["lightmem"]["llm_calls"] < systems["per-turn"]["llm_calls"] / 3
    # The stub restates every turn: one fact per turn, no dead letters.
    assert systems["lightmem"]["entries"] == systems["per-turn"]["entries"] == 40
    assert all(s["dead_letters"] == 0 for s in systems.values())
    [ratio] = report["ratios_lightmem_over_per_turn"]  # one per system, not per mode
    assert ratio["calls"] == pytest.approx(
        systems["lightmem"]["llm_calls"] / systems["per-turn"]["llm_calls"], abs=1e-4)
    assert systems["lightmem"]["shared_phases"] == ["compress", "segment"]
    aim = next(a for a in report["aims"] if a["retrieval"] == "knn")
    assert len(report["aims"]) == 2
    assert aim["calls_over_per_turn"] == ratio["calls"]
    assert aim["calls_met"] is (ratio["calls"] <= 1 / 20)
    assert aim["recall_met"] is (systems["lightmem"]["recall_at_words"]["512"]
                                 >= systems["naive"]["recall_at_words"]["512"])
    markdown = (out / "locomo.md").read_text()
    assert "## Aims" in markdown and "## Retrieval aims (issue 15)" in markdown
    assert {(a["system"], a["retrieval"]) for a in report["retrieval_aims"]} == {
        ("LightMem extractive r=0.6 embeds original", f"{mode}, shows {shown}")
        for mode in ("knn", "hybrid") for shown in ("original", "compressed")}
    for s in report["systems"]:
        at_k = [s["recall_at_k"][k] for k in ("5", "10", "20")]
        at_s = [s["session_recall_at_k"][k] for k in ("5", "10", "20")]
        at_w = [s["recall_at_words"][w] for w in ("256", "512", "1024", "2048")]
        at_c = [s["content_recall_at_words"][w] for w in ("256", "512", "1024", "2048")]
        assert all(0.0 <= v <= 1.0 for v in at_k + at_s + at_w + at_c)
        # More context, more recall; a session hit is implied by a turn hit; content
        # credit never exceeds whole-turn credit.
        assert at_k == sorted(at_k) and at_w == sorted(at_w) and at_c == sorted(at_c)
        assert all(s_ >= k_ for s_, k_ in zip(at_s, at_k, strict=True))
        assert all(c <= w + 1e-9 for c, w in zip(at_c, at_w, strict=True))
        assert all(words <= int(w) for w, words in s["context_words"].items())
    # NaiveRAG's lines are whole turns: content credit equals whole-turn credit.
    assert (systems["naive"]["content_recall_at_words"]
            == systems["naive"]["recall_at_words"])
    # 40 turns hold fewer than 2048 words: the largest budget retrieves everything, and
    # compressed lines then earn less than whole turns.
    assert systems["extractive"]["recall_at_words"]["2048"] == 1.0
    assert systems["extractive"]["content_recall_at_words"]["2048"] < 1.0
    # Shown as said (the default), extractive lines are whole turns again.
    assert shows_original["content_recall_at_words"] == shows_original["recall_at_words"]
    assert shows_original["recall_at_k"] == systems["extractive"]["recall_at_k"]


def _routing_responder(request: dict[str, Any]) -> str | StubReply:
    """Extraction prompts get facts; answer prompts an answer; judge prompts a verdict."""
    system = request["messages"][0]["content"]
    if "extract long-term memories" in system:
        return fact_extraction_responder(request)
    if "You grade answers" in system:
        return "CORRECT" if "Generated answer: ANSWER" in request["messages"][-1]["content"] \
            else "WRONG"
    return "ANSWER"


@pytest.mark.models
def test_answer_mode_with_an_endpoint(locomo_path: Path, tmp_path: Path) -> None:
    with OpenAIStubServer(_routing_responder) as server:
        settings = load_settings(llm_base_url=server.base_url, llm_model="stub",
                                 data_dir=tmp_path / "unused")
        config = BenchConfig(data=locomo_path, limit_conversations=1, limit_turns=30,
                             limit_questions=3, systems=("naive",), answer=True,
                             retrieval=("knn",))
        report = run_locomo_bench(config, settings=settings)
        answer_prompts = [r for r in server.chat_requests
                          if "Question:" in r["messages"][-1]["content"]
                          and "Gold answer" not in r["messages"][-1]["content"]]
    [naive] = report.systems
    assert report.llm["source"] == "endpoint"
    assert naive.answer is not None and naive.answer.judged == naive.questions > 0
    assert naive.answer.correct == naive.questions  # every answer was "ANSWER"
    assert report.eval_llm is not None and report.eval_llm.calls == 2 * naive.questions
    assert len(answer_prompts) == naive.questions
    assert naive.llm.calls == 0  # answering is not memory-building cost


def test_specs_build_each_lightmem_system_once_per_compressor() -> None:
    one = BenchConfig(systems=("naive", "extractive"))
    assert [s.name for s in one.specs()] == [
        "NaiveRAG", "LightMem extractive r=0.6 embeds original"]
    both = BenchConfig(systems=("naive", "extractive", "lightmem"),
                       compressors=("entropy", "minilm"))
    assert [(s.name, s.compressor) for s in both.specs()] == [
        ("NaiveRAG", None),
        ("LightMem extractive r=0.6 embeds original [entropy]", "entropy"),
        ("LightMem extractive r=0.6 embeds original [minilm]", "minilm"),
        ("LightMem r=0.6 th=512 [entropy]", "entropy"),
        ("LightMem r=0.6 th=512 [minilm]", "minilm"),
    ]


@pytest.mark.models
def test_cli_compares_compressors_in_one_run(locomo_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "bench", "locomo", "--data", str(locomo_path), "--out", str(out),
        "--limit-conversations", "1", "--limit-turns", "24", "--systems", "extractive",
        "--retrieval", "knn", "--compressor", "entropy,minilm",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "locomo.json").read_text())
    systems = {s["compressor"]: s for s in report["systems"]}
    assert sorted(systems) == ["entropy", "minilm"]
    assert report["settings"]["compressor"] == "entropy,minilm"
    assert sorted(report["settings"]["compressor_backend_loaded"]) == ["entropy", "minilm"]
    assert all(s["entries"] == 24 for s in systems.values())
    # Both keep exactly the top r of each turn's words (the same count, other words).
    assert systems["entropy"]["words_stored"] == systems["minilm"]["words_stored"]
    assert "[entropy]" in systems["entropy"]["name"] and "[minilm]" in systems["minilm"]["name"]
    bad = CliRunner().invoke(app, ["bench", "locomo", "--data", str(locomo_path),
                                   "--compressor", "minilm,gzip"])
    assert bad.exit_code == 2 and "gzip" in bad.output
