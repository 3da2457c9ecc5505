"""PT, IM, DP and similarity agents, the embedded LM backend and answer-span extraction.

Fast tests use a tiny randomly initialised Llama model and a word-level tokenizer with a chat
template built here; ``slow`` tests load the packaged SmolLM2 (its converted cache is reused).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from visa.agents.answer_likelihood import (
    EvidenceLikelihoodAgent,
    MutualInformationAgent,
    PriorTokenPerplexityAgent,
)
from visa.agents.base import ImageItem, SampleItem
from visa.agents.judge import JudgeAgent
from visa.agents.text_image_similarity import pool_relative
from visa.agents.verbalize import EvidenceColumns, gather, strip_image_placeholders, verbalize
from visa.backends.base import AnswerLogprobsRequest, Backend, GenerateResult
from visa.backends.chat_spans import (
    SpanError,
    answer_token_positions,
    expand_placeholders,
    render_with_spans,
)
from visa.backends.embedded_lm import EmbeddedLMBackend
from visa.samples import Turn

# A Llama-2-like template that trims contents, unlike SmolLM2's ChatML.
INST_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<<SYS>> {{ m['content'] | trim }} <</SYS>> "
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] | trim }} [/INST]"
    "{% else %} {{ m['content'] | trim }} {{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} {% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = ["a", "the", "cat", "dog", "is", "on", "sofa", "what", "animal", "color", "orange", "brown", "stripes", "it", "lying", "blanket", "describe", "image", "assistant", "user", "system", "be", "brief", "hello", "hi", "how", "many", "two", "2", "+", "4", "yes", "no", "pêche", "très", "sucrée", "猫", "在", "哪里", "automatic", "analysis", "of", "can", "be", "wrong", "most", "likely", "shows", "tabby", "egyptian", "detected", "objects", "text", "written", "found", "picture", "pixels", "with", "detail", "regions", "and", "tonal", "range", "name", "main", "things", "shown", "here", "conversation", "about", "q", "final", "score", "1", "3", "5", "rate", "this", "you", "cannot", "see", "rating", "from", "description"]


def build_tokenizer(template: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + WORDS + list(".,:;!?()%\"'-x")))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>",
        additional_special_tokens=specials[3:],
    )
    tokenizer.chat_template = template
    return tokenizer


def tiny_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_backend():
    tokenizer = build_tokenizer(CHATML_TEMPLATE)
    backend = EmbeddedLMBackend(
        EmbeddedLMBackend.Params(min_shared_prefix=2, batch_tokens=256, max_batch=4, memo_size=0),
        model=tiny_model(len(tokenizer)), tokenizer=tokenizer,
    )
    backend.setup()
    return backend


CONTEXT = {
    "oa.tagger.labels": ["tabby", "tabby", "face"],
    "oa.tagger.top_labels": ["tabby", "egyptian", "dog"],
    "oa.tagger.top_probs": [0.7, 0.2, 0.01],
    "sc.ocr_text.text": "",
    "sc.ocr_text": 0,
    "sc.felzenszwalb": 120,
    "image.stats.width": 64,
    "image.stats.height": 48,
    "image.stats": 6.5,
}
CONVERSATION = (
    Turn("user", "<image>\nWhat animal is this?"),
    Turn("assistant", "a cat lying on a sofa."),
    Turn("user", "What color is it?"),
    Turn("assistant", "orange and brown with stripes."),
)


def sample(key: str = "s1", turns=CONVERSATION, context=CONTEXT, image_keys=("img1",)) -> SampleItem:
    return SampleItem(key=key, sample_id=key, turns=turns, image_keys=image_keys, context=dict(context or {}))


def hand_logprobs(backend: EmbeddedLMBackend, turns) -> list[np.ndarray]:
    """Log-probs of the answer tokens straight from the model's full logits (no batching, no cache)."""
    ids, positions = answer_token_positions(backend.tokenizer, [{"role": t.role, "content": t.text} for t in turns])
    with torch.no_grad():
        logits = backend.model(input_ids=torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    return [np.array([logp[p - 1, ids[p]].item() for p in turn]) for turn in positions]


# -- chat spans ---------------------------------------------------------------------------------
@pytest.mark.parametrize("template", [INST_TEMPLATE, CHATML_TEMPLATE])
def test_answer_spans_multi_turn_system_unicode(template: str) -> None:
    tokenizer = build_tokenizer(template)
    messages = [
        {"role": "system", "content": "be brief."},
        {"role": "user", "content": "how many ?"},
        {"role": "assistant", "content": " assistant "},  # same word as the role header; trimmed by INST
        {"role": "user", "content": "猫 在 哪里 ?"},
        {"role": "assistant", "content": "pêche très sucrée ."},
    ]
    ids, positions = answer_token_positions(tokenizer, messages)
    assert len(positions) == 2
    assert tokenizer.convert_ids_to_tokens([ids[p] for p in positions[0]]) == ["assistant"]
    assert tokenizer.convert_ids_to_tokens([ids[p] for p in positions[1]]) == ["pêche", "très", "sucrée", "."]
    end_tokens = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    assert not end_tokens & {ids[p] for turn in positions for p in turn}


def test_spans_are_exact_characters_and_dropped_messages_are_none() -> None:
    def render(messages):  # a template that ignores system messages
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages if m["role"] != "system")

    messages = [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": "assistant"},
        {"role": "assistant", "content": "assistant"},
    ]
    rendered = render_with_spans(render, messages)
    assert rendered.spans[0] is None
    start, end = rendered.spans[2]
    assert rendered.text[start:end] == "assistant" and rendered.text[start - len("<assistant>") : start] == "<assistant>"
    with pytest.raises(SpanError):
        render_with_spans(lambda msgs: "constant", [{"role": "assistant", "content": "x"}]).spans_of(["assistant"])


def test_expand_placeholders_shifts_spans() -> None:
    text = "<img> question <img> answer"
    spans = [(21, 27)]
    expanded, moved = expand_placeholders(text, spans, "<img>", ["<p><p><p>", ""])
    assert expanded == "<p><p><p> question  answer"
    assert expanded[moved[0][0] : moved[0][1]] == "answer"
    with pytest.raises(SpanError):
        expand_placeholders(text, [(0, 3)], "<img>", ["x"])


@pytest.mark.slow
def test_answer_spans_on_the_smollm2_template(smollm) -> None:
    messages = [
        {"role": "user", "content": "Qu'est-ce que c'est ?"},
        {"role": "assistant", "content": "Une pêche — très sucrée."},
        {"role": "user", "content": "猫在哪里？"},
        {"role": "assistant", "content": "在沙发上。"},
    ]
    tokenizer = smollm.tokenizer
    ids, positions = answer_token_positions(tokenizer, messages)
    assert tokenizer.decode([ids[p] for p in positions[0]]) == "Une pêche — très sucrée."
    assert tokenizer.decode([ids[p] for p in positions[1]]) == "在沙发上。"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == ids[positions[1][-1] + 1]
    assert "system" in tokenizer.decode(ids[:5])  # SmolLM2's default system prompt was rendered


# -- the backend ----------------------------------------------------------------------------------
def test_batched_prefix_shared_equals_one_at_a_time(tiny_backend) -> None:
    v = "automatic analysis : it most likely shows tabby ."
    requests = [
        AnswerLogprobsRequest((Turn("user", f"{v} what animal ?"), Turn("assistant", "a cat ."))),
        AnswerLogprobsRequest((Turn("user", f"{v} what color ?"), Turn("assistant", "orange and brown ."))),
        AnswerLogprobsRequest((Turn("user", "what animal ?"), Turn("assistant", "a cat ."))),
        AnswerLogprobsRequest(CONVERSATION[:2] + (Turn("user", "how many ?"), Turn("assistant", "two"))),
        AnswerLogprobsRequest(CONVERSATION),
        AnswerLogprobsRequest((Turn("user", f"{v} what animal ?"), Turn("assistant", "a cat ."))),  # repeat
    ]
    together = tiny_backend.answer_logprobs(requests)
    for request, got in zip(requests, together, strict=True):
        alone = tiny_backend.answer_logprobs([request])[0]
        hand = hand_logprobs(tiny_backend, request.turns)
        assert [len(x) for x in got.per_turn] == [len(x) for x in hand]
        for x, y, z in zip(got.per_turn, alone.per_turn, hand, strict=True):
            np.testing.assert_allclose(x, y, atol=1e-5)
            np.testing.assert_allclose(x, z, atol=1e-5)


def test_targets_inside_a_shared_prefix_and_unpadded_singles(tiny_backend) -> None:
    # Five answers that differ only in their last word (the DP judge's shape): their shared prefix
    # holds the predicting positions of every target, so one forward serves all five.
    question = "automatic analysis : it most likely shows tabby . rate this image ."
    requests = [AnswerLogprobsRequest((Turn("user", question), Turn("assistant", f"final score : {k}")))
                for k in ("1", "2", "3", "4", "5")]
    # Very different lengths under one prefix: with max_padding 0.1 they run one at a time.
    requests += [AnswerLogprobsRequest((Turn("user", question), Turn("assistant", answer)))
                 for answer in ("yes", "a cat is lying on the sofa and the dog is on the blanket .")]
    forwards: list[tuple[int, int]] = []
    hook = tiny_backend._body.register_forward_pre_hook(
        lambda module, args, kwargs: forwards.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        got = tiny_backend.answer_logprobs(requests)
    finally:
        hook.remove()
    for request, result in zip(requests, got, strict=True):
        for x, z in zip(result.per_turn, hand_logprobs(tiny_backend, request.turns), strict=True):
            np.testing.assert_allclose(x, z, atol=1e-5)
    assert all(rows == 1 for rows, _ in forwards)  # shared prefixes and unpadded singles only
    assert sum(width for _, width in forwards) < sum(len(tiny_backend.encode(r)[0]) for r in requests) / 2


def test_forward_threads_follow_the_setting_never_the_load(tiny_backend, monkeypatch) -> None:
    import os

    configured = torch.get_num_threads()
    fixed = EmbeddedLMBackend(EmbeddedLMBackend.Params(threads=3), model=tiny_backend.model,
                              tokenizer=tiny_backend.tokenizer)
    assert fixed.forward_threads() == 3
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(os, "cpu_count", lambda: 2)
        for load in (4.0, 0.1, 2.0):  # a fixed count: results must not depend on what else runs
            monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
            assert tiny_backend.forward_threads() == 2
        with fixed._threads():
            assert torch.get_num_threads() == 3
        assert torch.get_num_threads() == 2  # restored for the rest of the process
    finally:
        torch.set_num_threads(configured)


def test_bad_requests_fail_alone(tiny_backend) -> None:
    from PIL import Image

    good = AnswerLogprobsRequest(CONVERSATION[:2])
    results = tiny_backend.answer_logprobs(
        [good, AnswerLogprobsRequest(CONVERSATION[:2], (Image.new("RGB", (4, 4)),)),
         AnswerLogprobsRequest((Turn("user", "hi"),))]
    )
    assert not isinstance(results[0], Exception)
    assert isinstance(results[1], ValueError) and "text only" in str(results[1])
    assert isinstance(results[2], ValueError) and "no assistant" in str(results[2])


def test_generate_batched_equals_single(tiny_backend) -> None:
    from visa.backends.base import GenerateRequest, Message

    requests = [
        GenerateRequest((Message("user", "what animal ?"),), max_new_tokens=5),
        GenerateRequest((Message("system", "be brief ."), Message("user", "hello how many cat is on the sofa ?")), 5),
    ]
    together = tiny_backend.generate(requests)
    assert [r.text for r in together] == [tiny_backend.generate([r])[0].text for r in requests]


# -- PT and IM ------------------------------------------------------------------------------------
def test_pt_and_im_equal_a_hand_computation(tiny_backend) -> None:
    item = sample()
    pt = PriorTokenPerplexityAgent(PriorTokenPerplexityAgent.Params(k=3), backend=tiny_backend)
    im = MutualInformationAgent(backend=tiny_backend)
    pt.setup(), im.setup()
    assert pt.needs == EvidenceColumns().columns() and not pt.uses_images

    plain = tuple(Turn(t.role, strip_image_placeholders(t.text)) for t in CONVERSATION)
    description = verbalize(gather(CONTEXT, EvidenceColumns()))
    assert "tabby (70%)" in description and "2 x tabby" in description and "Faces: 1" in description
    with_image = (Turn("user", f"{description}\n\n{plain[0].text}"),) + plain[1:]
    image_lp = hand_logprobs(tiny_backend, with_image)
    text_lp = hand_logprobs(tiny_backend, plain)

    pt_value = pt.score_batch([item])[0]
    expected_pt = -np.concatenate([turn[:3] for turn in image_lp]).mean()
    assert pt_value["tokens"] == sum(min(3, len(t)) for t in image_lp)
    assert pt_value["score"] == pytest.approx(expected_pt, abs=1e-5)

    im_value = im.score_batch([item])[0]
    ce_image, ce_text = -np.concatenate(image_lp).mean(), -np.concatenate(text_lp).mean()
    assert im_value["ce_image"] == pytest.approx(ce_image, abs=1e-5)
    assert im_value["ce_text"] == pytest.approx(ce_text, abs=1e-5)
    assert im_value["score"] == pytest.approx(ce_text - ce_image, abs=1e-5)


def test_text_only_and_evidence_free_samples(tiny_backend) -> None:
    pt = PriorTokenPerplexityAgent(backend=tiny_backend)
    im = MutualInformationAgent(backend=tiny_backend)
    text_only = sample("t", image_keys=(), context={})
    no_evidence = sample("n", context={"oa.tagger.labels": None})
    broken = sample("b", turns=(Turn("user", "hi"),))
    pt_results, im_results = pt.score_batch([text_only, no_evidence, broken]), im.score_batch([text_only, no_evidence, broken])
    assert isinstance(pt_results[0]["score"], float) and pt_results[1]["score"] is None
    assert im_results[0]["score"] is None and im_results[1]["score"] is None
    assert isinstance(pt_results[2], ValueError) and isinstance(im_results[2], ValueError)


def test_pixels_mode_needs_nothing_and_sends_images() -> None:
    from PIL import Image

    seen: list[AnswerLogprobsRequest] = []

    class Recording(Backend):
        def generate(self, requests):
            raise AssertionError("not used")

        def answer_logprobs(self, requests):
            seen.extend(requests)
            return [type("R", (), {"per_turn": (np.array([-1.0, -2.0]),) * 2})() for _ in requests]

    spec = {"type": "openai", "params": {"base_url": "http://localhost:1", "model": "m"}}
    agent = MutualInformationAgent(MutualInformationAgent.Params(backend=spec), backend=Recording())
    assert agent.needs == () and agent.uses_images
    image = Image.new("RGB", (8, 8))
    item = SampleItem("k", "k", CONVERSATION, images=(image,), image_keys=("i",))
    assert agent.score_batch([item])[0]["score"] == pytest.approx(0.0)
    assert seen[0].images == (image,) and seen[1].images == ()
    assert "<image>" not in seen[0].turns[0].text


def test_evidence_likelihood_is_a_difference_of_means(tiny_backend) -> None:
    agent = EvidenceLikelihoodAgent(backend=tiny_backend)
    result = agent.score_batch([sample()])[0]
    answer = agent.label_answer(sample())
    assert answer == "tabby, egyptian."
    question = agent.params.question
    convo = agent.conversation(agent.text_turns(sample()))
    prompt = f"{agent.params.preamble}\n{convo}\n\n{question}"
    with_text = hand_logprobs(tiny_backend, (Turn("user", prompt), Turn("assistant", answer)))[0]
    alone = hand_logprobs(tiny_backend, (Turn("user", question), Turn("assistant", answer)))[0]
    assert result["score"] == pytest.approx(with_text.mean() - alone.mean(), abs=1e-5)


def test_template_must_have_placeholders() -> None:
    with pytest.raises(ValueError, match="evidence"):
        MutualInformationAgent.Params(template="{question}")


# -- similarity -----------------------------------------------------------------------------------
def test_pool_relative_similarity_ranks_the_own_image() -> None:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(6, 16)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts = images + 0.3 * rng.normal(size=images.shape).astype(np.float32)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    # rows 0-5 aligned, rows 6-11 the same texts on the next image, row 12 text-only
    pairs = [(i, i) for i in range(6)] + [(i, (i + 1) % 6) for i in range(6)]
    table = pa.table({
        "key": [f"k{n}" for n in range(13)],
        "text_embedding": [texts[t].tolist() for t, _ in pairs] + [None],
        "image_embedding": [images[m].tolist() for _, m in pairs] + [None],
    })
    scores = pool_relative(table, reference_images=64)
    assert scores[12] is None
    assert all(scores[i] > 0 for i in range(6)) and all(scores[i] < scores[i - 6] for i in range(6, 12))
    shuffled = pool_relative(table.take(list(range(12, -1, -1))), reference_images=64)
    np.testing.assert_allclose(shuffled[::-1][:12], scores[:12])  # independent of row order


# -- DP judge -------------------------------------------------------------------------------------
class ScriptedBackend(Backend):
    """Answers generate requests with fixed texts (a collaborator of the judge, not the judge)."""

    def __init__(self, texts):
        self.texts = list(texts)
        self.requests = []

    def generate(self, requests):
        self.requests.extend(requests)
        return [GenerateResult(self.texts.pop(0)) for _ in requests]

    def answer_logprobs(self, requests):
        raise AssertionError("not used")


def test_judge_generate_keeps_raw_and_parses_the_final_score() -> None:
    from PIL import Image

    backend = ScriptedBackend(["Visual elements: score 2\nFinal score: 4", "I like it.", "最终评分：5"])
    params = JudgeAgent.Params(backend={"type": "openai", "params": {"base_url": "http://x", "model": "m"}})
    judge = JudgeAgent(params, backend=backend)
    assert judge.mode == "generate" and not judge.verbalized
    items = [ImageItem(f"i{n}", Image.new("RGB", (8, 8))) for n in range(3)]
    results = judge.score_batch(items)
    assert [r["score"] for r in results] == [4.0, None, 5.0]
    assert results[0]["raw"].endswith("Final score: 4") and results[1]["parse_error"] == "no final score marker"
    system, user = backend.requests[0].messages
    assert "eight perspectives" in system.text and "Final score: 5" in system.text  # rubric + examples
    assert user.images == (items[0].image,)


def test_judge_likelihood_over_a_verbalized_image(tiny_backend) -> None:
    from PIL import Image

    # the tagger's outputs for the judge to verbalise, as the pipeline hands them over (its needs)
    tagger = {"oa.tagger.labels": ["tabby"], "oa.tagger.top_labels": ["tabby", "dog"], "oa.tagger.top_probs": [0.9, 0.05]}
    judge = JudgeAgent(JudgeAgent.Params(examples=False), backend=tiny_backend)
    assert judge.mode == "likelihood" and judge.verbalized
    result = judge.score_batch([ImageItem("i", Image.new("RGB", (8, 8)), context=tagger)])[0]
    assert 1.0 <= result["score"] <= 5.0
    probs = [float(p) for p in result["raw"].split("=")[1].split()]
    assert len(probs) == 5 and sum(probs) == pytest.approx(1.0, abs=2e-3)
    assert result["score"] == pytest.approx(sum(k * p for k, p in zip(range(1, 6), probs, strict=True)), abs=5e-3)


def test_rubric_languages() -> None:
    from visa.agents.dp_rubric import system_prompt

    assert "最终评分：3" in system_prompt("zh") and "Final score: 1" in system_prompt("en")
    assert "Examples" not in system_prompt("en", examples=False)
    with pytest.raises(ValueError):
        system_prompt("fr")


# -- the real packaged model ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm():
    from visa.backends.embedded_lm import EmbeddedModelError

    backend = EmbeddedLMBackend()
    try:
        backend.setup()
    except EmbeddedModelError as error:
        pytest.skip(str(error))
    yield backend
    backend.teardown()


@pytest.mark.slow
def test_smollm2_im_prefers_the_matching_description(smollm) -> None:
    im = MutualInformationAgent(backend=smollm)
    cat = sample("cat")
    rocket_context = {"oa.tagger.top_labels": ["missile", "space shuttle"], "oa.tagger.top_probs": [0.6, 0.3]}
    rocket = sample("rocket", context=rocket_context)
    cat_im, rocket_im = (r["score"] for r in im.score_batch([cat, rocket]))
    assert cat_im > rocket_im
