from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from trainer.cleaning import clean, drop_over_length, redact
from trainer.data import (
    IGNORE,
    DataError,
    encode_example,
    normalize_record,
    pick_pad_id,
    prompt_and_reference,
    read_jsonl,
    split_train_val,
)


@pytest.fixture(scope="module")
def tok(tiny_base):
    return AutoTokenizer.from_pretrained(str(tiny_base))


def _write(tmp_path, rows):
    p = tmp_path / "d.jsonl"
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


def test_all_shapes_normalize_to_the_same_chat():
    want = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    assert normalize_record({"prompt": "Q", "completion": "A"}) == want
    assert normalize_record({"prompt": "Q", "response": "A"}) == want
    assert normalize_record({"instruction": "Q", "output": "A"}) == want
    assert normalize_record({"instruction": "Q", "input": "", "output": "A"}) == want
    assert normalize_record(want) == want
    assert normalize_record({"instruction": "Q", "input": "ctx", "output": "A"})["messages"][0] \
        == {"role": "user", "content": "Q\n\nctx"}
    assert normalize_record({"text": "plain"}) == {"text": "plain"}


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "d.jsonl:2: not valid JSON"),
    ('["a"]', "d.jsonl:2: expected a JSON object, got list"),
    ('{"question": "q", "answer": "a"}', "unknown record shape with keys ['answer', 'question']"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "has no assistant turn"),
    ('{"messages": [{"role": "bot", "content": "q"}]}', "messages[0].role 'bot' is not one of"),
    ('{"prompt": 3, "completion": "a"}', "field 'prompt' must be a string, got int"),
])
def test_bad_data_files_name_the_line(tmp_path, line, message):
    p = _write(tmp_path, [{"prompt": "ok", "completion": "fine"}, line])
    with pytest.raises(DataError) as e:
        read_jsonl(p)
    assert message in str(e.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no examples"):
        read_jsonl(tmp_path / "empty.jsonl")


def test_pad_is_distinct_from_eos(tok):
    assert tok.pad_token_id == tok.eos_token_id  # as in SmolLM2's config
    pad = pick_pad_id(tok)
    assert pad != tok.eos_token_id and pad == tok.convert_tokens_to_ids("<|endoftext|>")


def test_loss_mask_covers_response_and_eos_only(tok):
    ex = normalize_record({"prompt": "What is 2+2?", "completion": "4"})
    enc = encode_example(tok, ex)
    trained = [t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE]
    assert tok.decode(trained) == "4<|im_end|>"
    assert trained[-1] == tok.eos_token_id
    # the prompt part is exactly what a server feeds for generation
    prompt_ids, ref = prompt_and_reference(tok, ex)
    assert enc.input_ids[:len(prompt_ids)] == prompt_ids and ref == "4"
    assert tok.decode(enc.input_ids).startswith("<|im_start|>system\n")
    # train_on_prompt trains everything except the newline after EOS
    full = encode_example(tok, ex, train_on_prompt=True)
    assert sum(lab != IGNORE for lab in full.labels) == len(full.labels) - 1


def test_multi_turn_trains_every_assistant_turn(tok):
    ex = normalize_record({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Ciao"}]})
    enc = encode_example(tok, ex)
    trained = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels, strict=True)
                          if lab != IGNORE])
    assert trained == "Hello<|im_end|>Ciao<|im_end|>"
    rendered = tok.apply_chat_template(ex["messages"], tokenize=False)
    assert tok.decode(enc.input_ids) == rendered


def test_plain_text_trains_all_tokens_plus_eos(tok):
    enc = encode_example(tok, {"text": "Hello there!"})
    assert enc.labels == enc.input_ids and enc.input_ids[-1] == tok.eos_token_id


def test_system_prompt_is_prepended(tok):
    ex = normalize_record({"prompt": "Q", "completion": "A"})
    enc = encode_example(tok, ex, system_prompt="Answer tersely.")
    assert "Answer tersely." in tok.decode(enc.input_ids)


def test_cleaning_drops_and_reports(tmp_path):
    rows = [
        {"prompt": "Say hi", "completion": "hi"},
        {"prompt": "Say hi", "completion": "hi"},                 # exact duplicate
        {"prompt": "say HI!", "completion": "Hi."},               # near duplicate
        {"prompt": " Say hi\r\n", "completion": "hi  "},          # duplicate after normalising
        {"prompt": "Empty answer", "completion": "   "},
        {"text": ""},
        {"prompt": "Tell me a secret", "completion": "The password is swordfish"},
        {"prompt": "Say bye", "completion": "bye"},
    ]
    examples = read_jsonl(_write(tmp_path, rows))
    kept, report = clean(examples, blocklist=("swordfish",))
    assert [ex["line"] for ex in kept] == [1, 8]
    assert report.dropped == {"duplicate": 2, "near_duplicate": 1, "empty": 2, "blocklist": 1}
    reasons = {r["line"]: r["reason"] for r in report.to_dict()["dropped_examples"]}
    assert reasons == {2: "duplicate", 3: "near_duplicate", 4: "duplicate", 5: "empty",
                       6: "empty", 7: "blocklist"}
    assert report.total == 8 and report.kept == 2
    keep = drop_over_length(kept, [10, 99], 50, report)
    assert keep == [0] and report.dropped["over_length"] == 1 and report.kept == 1


def test_pii_redaction():
    counts = {"email": 0, "phone": 0, "card": 0}
    text = ("Mail jane.doe@example.com or call +1 415-555-0134; card 4111 1111 1111 1111, "
            "order 1234 5678 9012 3456 and 2021-03-05 stay.")
    out = redact(text, counts)
    assert "[EMAIL]" in out and "[PHONE]" in out and "[CARD]" in out
    assert "1234 5678 9012 3456" in out  # fails the Luhn check: not a card
    assert "2021-03-05" in out
    assert counts == {"email": 1, "phone": 1, "card": 1}


def test_split_is_seeded_and_disjoint():
    examples = [{"text": str(i), "line": i} for i in range(50)]
    a_train, a_val = split_train_val(examples, 0.2, seed=1)
    b_train, b_val = split_train_val(examples, 0.2, seed=1)
    c_train, c_val = split_train_val(examples, 0.2, seed=2)
    assert a_val == b_val and a_val != c_val and len(a_val) == 10
    assert {e["line"] for e in a_train} | {e["line"] for e in a_val} == set(range(50))


def test_preview_decodes_chinese_spans_whole(tok):
    from trainer.data import preview

    ex = normalize_record({"prompt": "把日期改写成 ISO 格式：二〇二一年三月五日",
                           "completion": "答案：2021-03-05"})
    enc = encode_example(tok, ex)
    pieces = [tok.decode([t]) for t in enc.input_ids]
    assert any("\ufffd" in p for p in pieces)  # one token at a time garbles the text
    text = preview(tok, enc)
    assert "\ufffd" not in text
    assert "把日期改写成 ISO 格式：二〇二一年三月五日<|im_end|>" in text
    assert "[[答案：2021-03-05<|im_end|>]]" in text
    # a cut by max_tokens never lands inside a character either
    for n in range(5, len(enc.input_ids)):
        assert "\ufffd" not in preview(tok, enc, max_tokens=n)


GEMMA_STYLE = (  # turns end with <end_of_turn>, which is not the EOS token (as in Gemma 3)
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
    "{{ m['content'] | trim }}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def test_answers_end_at_the_template_turn_end_the_server_stops_on(tok, tmp_path):
    """A template that closes turns with a special token other than EOS (Gemma's
    <end_of_turn>): the answer is trained up to it, not up to an EOS appended after the
    template's newline, and the trainer stops on the same tokens as a server."""
    from server.model_store import stop_token_ids
    from trainer.data import stop_ids

    tok.save_pretrained(tmp_path)
    gemma = AutoTokenizer.from_pretrained(tmp_path)
    gemma.add_special_tokens({"additional_special_tokens": ["<start_of_turn>",
                                                            "<end_of_turn>"]})
    gemma.chat_template = GEMMA_STYLE
    gemma.save_pretrained(tmp_path)
    gemma = AutoTokenizer.from_pretrained(tmp_path)
    eos, eot = gemma.eos_token_id, gemma.convert_tokens_to_ids("<end_of_turn>")
    assert eot != eos
    assert stop_ids(gemma) == stop_token_ids(gemma) == (eos, eot)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, eos]}))
    assert stop_token_ids(gemma, tmp_path) == (eos, eot, 7)  # what the server stops on
    ex = normalize_record({"prompt": "What is 2+2?", "completion": "4"})
    enc = encode_example(gemma, ex)
    trained = [t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE]
    assert trained[-1] == eot and eos not in enc.input_ids
    assert gemma.decode(trained) == "4<end_of_turn>"
    assert gemma.decode(enc.input_ids) == gemma.apply_chat_template(ex["messages"],
                                                                    tokenize=False)
    # the SmolLM-style template ends its turns with EOS itself: nothing else stops
    assert stop_ids(tok) == (tok.eos_token_id,)
