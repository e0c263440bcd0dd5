"""The variable-binding chain task family and the embedded reasoning teacher (transformers_red.demo.chain_task)."""

import re

import pytest
import torch

from transformers_red.demo.chain_task import (
    END_MARKER,
    MAX_VALUE,
    RATIONALES,
    Problem,
    build_task_tokenizer,
    evaluate_model,
    format_example,
    generate_mixed_problems,
    generate_problems,
    load_reasoning_teacher,
    parse_answer,
    reasoning_teacher_dir,
    score_answer,
    teacher_report,
    weights_digest,
)

_CONST = re.compile(r"^([a-z])=(\d+)$")
_DERIVED = re.compile(r"^([a-z])=([a-z])([-+*])(\d+)$")


def execute(prompt: str) -> tuple[int, int, list[int]]:
    """Re-execute a prompt: (answer, number of composition steps used, values along the chain)."""
    *statements, query = prompt.split(";")
    assert query.startswith("?") and len(query) == 2
    env: dict[str, tuple] = {}
    for stmt in statements:
        if m := _CONST.match(stmt):
            env[m.group(1)] = ("const", int(m.group(2)))
        else:
            m = _DERIVED.match(stmt)
            assert m, f"malformed statement {stmt!r}"
            name, src, op, c = m.groups()
            assert src in env, "operands are bound before use"
            env[name] = (op, src, int(c))
    assert len(env) == len(statements), "variables are distinct"

    def value(name):
        entry = env[name]
        if entry[0] == "const":
            return entry[1], 0, [entry[1]]
        op, src, c = entry
        v, depth, chain = value(src)
        result = {"+": v + c, "-": v - c, "*": v * c}[op]
        return result, depth + 1, chain + [result]

    return value(query[1])


def rationale_results(target: str) -> list[int]:
    """The value each rationale step ends with (after its last '='), and the final answer."""
    assert target.startswith(" => ")
    *steps, final = target[4:].split(";")
    assert final.startswith("#")
    return [int(step.rsplit("=", 1)[1]) for step in steps] + [int(final[1:])]


# --------------------------------------------------------------------------- generator
def test_generator_deterministic_and_seed_dependent():
    a = generate_problems(50, 3, seed=0)
    assert a == generate_problems(50, 3, seed=0)
    assert [p.prompt for p in a] != [p.prompt for p in generate_problems(50, 3, seed=1)]
    assert [p.prompt for p in a] != [p.prompt for p in generate_problems(50, 4, seed=0)]
    mixed = generate_mixed_problems(100, range(0, 5), seed=3)
    assert mixed == generate_mixed_problems(100, range(0, 5), seed=3)
    assert mixed != generate_mixed_problems(100, range(0, 5), seed=4)
    assert {p.hops for p in mixed} == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("hops", [0, 1, 2, 4, 6, 9])
@pytest.mark.parametrize("rationale", RATIONALES)
@pytest.mark.parametrize("task", [{}, {"distractors": (1, 2), "max_value": 99}], ids=["shipped", "distractors-99"])
def test_hop_count_and_rationale_are_correct(hops, rationale, task):
    max_value = task.get("max_value", MAX_VALUE)
    n_distractors = set()
    for p in generate_problems(40, hops, seed=11, rationale=rationale, **task):
        answer, depth, chain = execute(p.prompt)
        assert depth == hops == p.hops
        assert answer == p.answer
        assert list(p.values) == chain
        assert all(0 <= v <= max_value for v in chain)
        # Distractors are constants only: exactly `hops` derived bindings, the rest are constants.
        statements = p.prompt.split(";")[:-1]
        assert sum(bool(_DERIVED.match(s)) for s in statements) == hops
        n_distractors.add(sum(bool(_CONST.match(s)) for s in statements) - 1)
        # The rationale writes every intermediate value in chain order, then the answer.
        assert rationale_results(p.target) == chain[1:] + [answer]
        if rationale in ("compact", "explicit"):
            assert [s.split("=")[0] for s in p.target[4:].split(";")[:-1]] == list(p.chain[1:])
        assert format_example(p) == p.prompt + p.target + END_MARKER == p.text
    assert n_distractors == ({1, 2} if "distractors" in task else {0})


def test_examples_of_each_rationale():
    p = generate_problems(1, 2, seed=0)[0]  # the shipped task: no distractors, values 0..9, "values" rationale
    a, b, c = p.chain
    v0, v1, v2 = p.values
    assert re.fullmatch(rf"{a}={v0};{b}={a}[-+*]\d;{c}={b}[-+*]\d;\?{c}", p.prompt)
    assert re.fullmatch(rf" => {v0}[-+*]\d={v1};{v1}[-+*]\d={v2};#{v2}", p.target)
    for rationale, pattern in [("explicit", rf" => {b}={v0}[-+*]\d={v1};{c}={v1}[-+*]\d={v2};#{v2}"),
                               ("compact", rf" => {b}={v1};{c}={v2};#{v2}")]:
        q = generate_problems(1, 2, seed=0, rationale=rationale)[0]
        assert q.prompt == p.prompt  # the rationale style does not change the problem
        assert re.fullmatch(pattern, q.target), (rationale, q.target)
    control = generate_problems(1, 0, seed=0)[0]
    assert re.fullmatch(r"([a-z])=(\d);\?\1 => #\2", control.prompt + control.target)


def test_value_range_and_bad_arguments():
    for p in generate_problems(200, 5, seed=2):
        assert all(0 <= v <= MAX_VALUE == 9 for v in execute(p.prompt)[2])
    big = [v for p in generate_problems(200, 5, seed=2, max_value=99) for v in p.values]
    assert max(big) > 9 and all(0 <= v <= 99 for v in big)
    with pytest.raises(ValueError):
        generate_problems(1, -1)
    with pytest.raises(ValueError):
        generate_problems(1, 2, rationale="verbose")
    with pytest.raises(ValueError):
        generate_problems(1, 30)
    with pytest.raises(ValueError):
        generate_mixed_problems(4, range(3), weights=[1, 2])
    weighted = generate_mixed_problems(300, range(3), seed=0, weights=[0, 0, 1])
    assert {p.hops for p in weighted} == {2}


# --------------------------------------------------------------------------- scoring
def test_score_answer():
    p = Problem(prompt="a=7;b=a+5;?b", target=" => b=7+5=12;#12", answer=12, hops=1)
    assert score_answer(" => b=7+5=12;#12", p)
    assert score_answer(p.prompt + p.target, p)  # prompt + continuation is fine too
    assert score_answer(" => #12" + END_MARKER + "junk #3", p)  # text after the end marker is ignored
    assert score_answer(" => b=7+5=12;#12 ", p)
    assert not score_answer(" => b=7+5=13;#13", p)  # wrong
    assert not score_answer(" => b=7+5=12;#120", p)
    assert not score_answer(" => b=7+5=12;", p)  # no final answer (e.g. cut by max_new_tokens)
    assert not score_answer(" => b=7+5=12;#12;c=3", p)  # the answer must end the continuation
    assert not score_answer("", p)
    assert not score_answer("#", p)
    assert parse_answer("x=3;#45") == 45 and parse_answer("#x") is None


# --------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip_and_reload(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = build_task_tokenizer()
    assert isinstance(tok, PreTrainedTokenizerFast)
    texts = [format_example(p) for h in (0, 3, 6) for p in generate_problems(5, h, seed=h)]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert len(ids) == 1 + len(text) - len(END_MARKER) + 1  # one id per character
        assert tok.decode(ids, skip_special_tokens=True) == text[: -len(END_MARKER)]
        assert tok.unk_token_id not in ids
    assert tok("A")["input_ids"] == [tok.bos_token_id, tok.unk_token_id]

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert isinstance(again, PreTrainedTokenizerFast)
    assert again.get_vocab() == tok.get_vocab() and len(again) == len(tok)
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (0, 1, 2)
    assert again.padding_side == "left"
    pair = [texts[-1], texts[0]]  # a 6-hop and a control example: different lengths
    batch = again(pair, padding=True)
    assert batch["input_ids"] == tok(pair, padding=True)["input_ids"]
    assert batch["input_ids"][1][0] == again.pad_token_id  # left padding, for generation
    assert batch["input_ids"][1][-1] == again.eos_token_id


# --------------------------------------------------------------------------- embedded teacher
@pytest.fixture(scope="module")
def teacher():
    # One thread: tiny matmuls gain nothing from more, and on a busy (oversubscribed) CPU several threads
    # were measured up to 50x slower. Restored afterwards for the other test modules.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield load_reasoning_teacher()
    finally:
        torch.set_num_threads(threads)


def test_teacher_checkpoint_is_small_and_complete():
    folder = reasoning_teacher_dir()
    names = {f.name for f in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "training_report.json"} <= names
    assert sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) <= 10_000_000


def test_missing_teacher_has_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not a teacher folder with safetensors weights"):
        load_reasoning_teacher(tmp_path)  # a folder the user gave
    from transformers_red.demo import chain_task

    monkeypatch.setattr(chain_task, "reasoning_teacher_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="train_reasoning_teacher.py"):
        load_reasoning_teacher()  # the packaged one, missing


def test_teacher_loads_offline_and_reaches_its_reported_accuracy(teacher):
    from transformers import LlamaForCausalLM

    model, tok = teacher
    report = teacher_report()
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads < model.config.num_attention_heads
    assert sum(p.numel() for p in model.parameters()) == report["parameters"]
    assert weights_digest(model) == report["weights_sha256"]  # the shipped weights are the reported ones
    task = {**report["task"], "distractors": tuple(report["task"]["distractors"])}
    hops = report["hops"]
    checked = [hops[0], hops[len(hops) // 2], hops[-1]]
    # The first 50 problems of each checked hop count of the held-out set the report was measured on.
    problems = [p for h in checked for p in generate_problems(50, h, seed=report["eval_seed"], **task)]
    accuracy = evaluate_model(model, tok, problems, batch_size=50)
    for h in checked:
        assert accuracy[h] >= report["held_out_accuracy"][str(h)] - 0.08, (h, accuracy, report["held_out_accuracy"])
    assert accuracy[hops[0]] >= 0.95


def test_teacher_rationale_is_exact_on_a_sample(teacher):
    model, tok = teacher
    report = teacher_report()
    task = {**report["task"], "distractors": tuple(report["task"]["distractors"])}
    problems = generate_problems(20, 2, seed=99, **task)
    accuracy, outputs = evaluate_model(model, tok, problems, return_outputs=True)
    exact = sum(text == p.target for p, text, _ in outputs)
    assert exact >= 17 and accuracy[2] >= 0.85
    for p, text, correct in outputs:
        assert correct == (parse_answer(text) == p.answer)
