"""Conversations: every reused turn equals a from-scratch run of the chat template's prompt, isolation, memory
bounds, context and turn limits, Stop and Regenerate."""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import moving_square_clip, run_in_threads
from dycoke.config import DyCokeConfig
from dycoke.conversation import REENCODED, Conversation, Notice
from dycoke.limits import RequestError
from dycoke.memory import ConversationMemory
from dycoke.methods import get_method
from dycoke.pipeline import Pipeline, Result, StepTrace, TextDelta

QUESTIONS = ["What moves in this video?", "Which colour is it?", "Where does it go next?"]
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def pipeline64():
    """float64, so that float noise (a prefill in one piece or in turns) cannot flip a greedy token."""
    from dycoke.models import load

    return Pipeline(load("tiny-random", device="cpu", dtype=torch.float64))


@pytest.fixture(scope="module")
def clip16():
    return moving_square_clip(16)


@pytest.fixture(scope="module")
def clip4():
    """For the tests of bookkeeping rather than of numbers: fewer tokens, same code paths."""
    return moving_square_clip(4)


def template_prompt(tokenizer, questions: list[str], answers: list[str]) -> tuple[list[int], list[int]]:
    """The chat template's own rendering of the conversation, split at the video into token ids before and after."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": questions[0]}]}]
    for answer, question in zip(answers, questions[1:]):
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    before, after = text.split("<video>", 1)
    encode = lambda part: tokenizer(part, add_special_tokens=False).input_ids  # noqa: E731
    return encode(before), encode(after)


def from_scratch(pipeline: Pipeline, clip, method: str, prompt: tuple[list[int], list[int]]) -> Result:
    """One plain request on the whole prompt: fresh features, fresh cache, one prefill."""
    chosen = get_method(method)
    settings = chosen.effective_config(DyCokeConfig())
    with torch.inference_mode():
        prepared = pipeline.prepare(clip, prompt, chosen, settings)
    events = pipeline.generate(prepared, clip, chosen, settings, NEW_TOKENS, ignore_eos=False)
    return next(event for event in events if isinstance(event, Result))


def spoken(tokenizer, token_ids: list[int]) -> str:
    """An answer as the chat template's assistant content: its text, without the end-of-turn token."""
    if token_ids and token_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>"):
        token_ids = token_ids[:-1]
    return tokenizer.decode(token_ids)


def converse(conversation: Conversation, questions: list[str] = QUESTIONS) -> list[Result]:
    return [conversation.answer(question) for question in questions]


@pytest.mark.parametrize("frames", [8, 16])
@pytest.mark.parametrize("method", ["baseline", "ttm", "dp", "dycoke"])
def test_reused_turns_equal_a_from_scratch_run_of_the_template_prompt(pipeline64, clip8, clip16, method, frames):
    clip = clip8 if frames == 8 else clip16
    tokenizer = pipeline64.loaded.tokenizer
    conversation = Conversation(pipeline64, clip, method, max_new_tokens=NEW_TOKENS)
    answers: list[str] = []
    previous_after: list[int] = []
    previous_answer: list[int] = []
    for turn, question in enumerate(QUESTIONS):
        prompt = template_prompt(tokenizer, QUESTIONS[:turn + 1], answers)
        if turn == len(QUESTIONS) - 1:  # the conversation builds the same prompt the template renders
            assert conversation.prompt_ids(question) == prompt[1]
        reference = from_scratch(pipeline64, clip, method, prompt)
        result = conversation.answer(question)
        assert result.token_ids == reference.token_ids, f"turn {turn + 1}"
        assert result.trace["steps"] == reference.trace["steps"]
        assert result.metrics["prefix_reused"] is (turn > 0)
        if turn == 0:
            expected_prefill = len(prompt[0]) + reference.metrics["visual_tokens_after_ttm"] + 1 + len(prompt[1])
        elif method in ("dp", "dycoke"):  # the previous answer is prefilled again, now attending to everything
            expected_prefill = len(prompt[1]) - len(previous_after)
        else:  # only the previous answer's last token, which generate never fed back, and the new text
            expected_prefill = len(prompt[1]) - len(previous_after) - len(previous_answer) + 1
        assert result.metrics["prefill_tokens"] == expected_prefill
        if method in ("dp", "dycoke"):
            assert result.trace["steps"][0]["reselected"], "a new turn must start a fresh selection"
        answers.append(spoken(tokenizer, result.token_ids))
        previous_after, previous_answer = prompt[1], result.token_ids


def test_without_reuse_every_turn_recomputes_the_same_answers(pipeline64, clip4):
    reused = converse(Conversation(pipeline64, clip4, "dycoke", max_new_tokens=NEW_TOKENS))
    recomputed = converse(Conversation(pipeline64, clip4, "dycoke", max_new_tokens=NEW_TOKENS, reuse=False))
    assert [r.token_ids for r in recomputed] == [r.token_ids for r in reused]
    assert [r.metrics["prefix_reused"] for r in recomputed] == [False] * 3
    assert all(r.metrics["vision_ms"] > 0 for r in recomputed)


def test_methods_whose_cache_cannot_resume_recompute_each_turn(pipeline64, clip4):
    results = converse(Conversation(pipeline64, clip4, "fastv", max_new_tokens=NEW_TOKENS), QUESTIONS[:2])
    assert [r.metrics["prefix_reused"] for r in results] == [False, False]
    prompt = template_prompt(pipeline64.loaded.tokenizer, QUESTIONS[:2], [spoken(pipeline64.loaded.tokenizer,
                                                                                  results[0].token_ids)])
    assert results[1].token_ids == from_scratch(pipeline64, clip4, "fastv", prompt).token_ids


def test_two_conversations_on_one_clip_encode_it_once(pipeline64, monkeypatch):
    clip = moving_square_clip(4, seed=3)
    encoded = []
    original = Pipeline._vision_features

    def counting(self, *args, **kwargs):
        encoded.append(args[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "_vision_features", counting)
    Conversation(pipeline64, clip, "baseline", max_new_tokens=2).answer(QUESTIONS[0])
    Conversation(pipeline64, clip, "dycoke", max_new_tokens=2).answer(QUESTIONS[0])
    assert len(encoded) == 1


def solo(pipeline, clip, method: str) -> list[list[int]]:
    return [r.token_ids for r in converse(Conversation(pipeline, clip, method, max_new_tokens=NEW_TOKENS))]


def test_interleaved_conversations_never_see_each_others_turns(pipeline64, clip4, one_intra_op_thread):
    other_clip = moving_square_clip(4, seed=7)
    expected = {"a": solo(pipeline64, clip4, "dycoke"), "b": solo(pipeline64, other_clip, "dycoke")}
    first = Conversation(pipeline64, clip4, "dycoke", max_new_tokens=NEW_TOKENS)
    second = Conversation(pipeline64, other_clip, "dycoke", max_new_tokens=NEW_TOKENS)
    got = {"a": [], "b": []}
    for question in QUESTIONS:
        got["a"].append(first.answer(question).token_ids)
        got["b"].append(second.answer(question).token_ids)
    assert got == expected
    assert expected["a"] != expected["b"]  # the check could fail: the clips lead to different answers

    threaded = [Conversation(pipeline64, clip, "dycoke", max_new_tokens=NEW_TOKENS) for clip in (clip4, other_clip)]
    results = run_in_threads([lambda c=c: [r.token_ids for r in converse(c)] for c in threaded])
    assert results == [expected["a"], expected["b"]]
    assert not generate_threads()


def test_an_evicted_conversation_says_the_video_was_re_encoded_and_answers_the_same(pipeline64, clip4):
    expected = solo(pipeline64, clip4, "dycoke")
    memory = ConversationMemory(max_conversations=1)
    pipeline = Pipeline(pipeline64.loaded, memory=memory)
    first = Conversation(pipeline, clip4, "dycoke", max_new_tokens=NEW_TOKENS)
    second = Conversation(pipeline, clip4, "baseline", max_new_tokens=NEW_TOKENS)
    first.answer(QUESTIONS[0])
    second.answer(QUESTIONS[0])  # the newer conversation pushes the older one's cache out
    assert memory.conversations == 1 and not memory.holds(first)
    events = list(first.ask(QUESTIONS[1]))
    assert events[0] == Notice(REENCODED)
    assert "the video was re-encoded" in REENCODED
    result = events[-1]
    assert result.metrics["prefix_reused"] is False and result.token_ids == expected[1]
    assert first.answer(QUESTIONS[2]).token_ids == expected[2]  # and the turn after reuses again
    assert first.turns[-1].result.metrics["prefix_reused"] is True


def test_a_byte_budget_smaller_than_one_cache_keeps_nothing_and_still_answers(pipeline64, clip4):
    expected = solo(pipeline64, clip4, "baseline")
    memory = ConversationMemory(max_bytes=1024)
    conversation = Conversation(Pipeline(pipeline64.loaded, memory=memory), clip4, "baseline",
                                max_new_tokens=NEW_TOKENS)
    results = []
    for question in QUESTIONS:
        events = list(conversation.ask(question))
        results.append(events[-1])
        if results[:-1]:
            assert events[0] == Notice(REENCODED)
    assert [r.token_ids for r in results] == expected
    assert memory.used_bytes <= 1024


@pytest.mark.parametrize("reuse", [True, False], ids=["reused-prefix", "recomputed-prefix"])
def test_a_turn_past_the_context_says_start_a_new_conversation_and_a_shorter_one_still_works(pipeline64, clip4,
                                                                                             reuse):
    """Checked before the turn's prefill: on the kept cache's length, or on the method's budget when the prefix
    is recomputed; both must agree with the prefix as measured."""
    probe = Conversation(pipeline64, clip4, "dycoke", max_new_tokens=NEW_TOKENS)
    first = probe.answer(QUESTIONS[0])
    video_prefix = first.metrics["prefill_tokens"] - len(probe.turns[0].prompt_ids)
    room = video_prefix + len(probe.prompt_ids("Why?")) + NEW_TOKENS + 40  # "Why?" fits, 80 more characters not
    conversation = Conversation(pipeline64, clip4, "dycoke", max_new_tokens=NEW_TOKENS, context_limit=room,
                                reuse=reuse)
    conversation.answer(QUESTIONS[0])
    with pytest.raises(RequestError, match="past the model's context of .*: start a new conversation$"):
        conversation.answer("Why? " + "x" * 80)
    assert len(conversation.turns) == 1
    assert conversation.answer("Why?").metrics["prefix_reused"] is reuse


def test_the_turn_limit_says_start_a_new_conversation(pipeline64, clip4):
    conversation = Conversation(pipeline64, clip4, "baseline", max_new_tokens=2, max_turns=2)
    converse(conversation, QUESTIONS[:2])
    with pytest.raises(RequestError, match="^this conversation has reached its limit of 2 turns: start a new"):
        conversation.answer(QUESTIONS[2])
    assert len(list(conversation.regenerate())) > 0  # a regenerated answer replaces a turn: still allowed


def generate_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "dycoke-generate" and t.is_alive()]


def test_stop_ends_generation_within_one_step_keeps_the_partial_answer_and_no_thread(pipeline64, clip4):
    conversation = Conversation(pipeline64, clip4, "dycoke", max_new_tokens=40, ignore_eos=True)
    forwards = []

    def stop_at_the_third_forward(module, args, output):
        forwards.append(True)
        if len(forwards) == 3:
            conversation.stop()

    hook = pipeline64.loaded.model.lm_head.register_forward_hook(stop_at_the_third_forward)
    try:
        events = list(conversation.ask(QUESTIONS[0]))
    finally:
        hook.remove()
    result = events[-1]
    assert len(forwards) == 3 and result.metrics["new_tokens"] == 3  # the step in progress ends, no further one
    assert result.metrics["stopped"] is True and conversation.turns[0].stopped
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == result.answer
    assert sum(isinstance(e, StepTrace) for e in events) == 2
    assert not generate_threads()
    follow_up = conversation.answer(QUESTIONS[1])  # the stopped answer is part of the conversation
    assert follow_up.metrics["stopped"] is False and follow_up.metrics["new_tokens"] == 40


def test_stop_from_another_thread_while_streaming(pipeline64, clip4):
    conversation = Conversation(pipeline64, clip4, "baseline", max_new_tokens=200, ignore_eos=True)
    events = conversation.ask(QUESTIONS[0])
    next(event for event in events if isinstance(event, TextDelta))
    stopper = threading.Thread(target=conversation.stop)
    stopper.start()
    stopper.join()
    result = [event for event in events if isinstance(event, Result)][0]
    assert result.metrics["stopped"] is True and result.metrics["new_tokens"] < 200
    assert not generate_threads()


def test_regenerate_asks_the_last_question_again_on_the_reused_prefix(pipeline64, clip4):
    conversation = Conversation(pipeline64, clip4, "dycoke", max_new_tokens=NEW_TOKENS)
    first, second = converse(conversation, QUESTIONS[:2])
    again = [event for event in conversation.regenerate() if isinstance(event, Result)][0]
    assert again.token_ids == second.token_ids and again.metrics["prefix_reused"] is True
    assert [turn.question for turn in conversation.turns] == QUESTIONS[:2]
    assert conversation.answer(QUESTIONS[2]).token_ids == solo(pipeline64, clip4, "dycoke")[2]


def test_a_turn_abandoned_mid_stream_leaves_the_conversation_as_it_was(pipeline64, clip4):
    conversation = Conversation(pipeline64, clip4, "dp", max_new_tokens=NEW_TOKENS)
    conversation.answer(QUESTIONS[0])
    events = conversation.ask(QUESTIONS[1])
    next(events)
    events.close()
    assert len(conversation.turns) == 1 and not generate_threads()
    assert [r.token_ids for r in converse(conversation, QUESTIONS[1:])] == solo(pipeline64, clip4, "dp")[1:]


def test_a_second_ask_while_one_runs_is_refused(pipeline64, clip4):
    conversation = Conversation(pipeline64, clip4, "baseline", max_new_tokens=NEW_TOKENS)
    running = conversation.ask(QUESTIONS[0])
    next(running)
    with pytest.raises(RequestError, match="still answering"):
        next(conversation.ask(QUESTIONS[1]))
    running.close()
