"""Prompt loading (toy, parquet, jsonl, datasets folders), bad-row reports, and the PromptLoader."""

import json
import logging

import pytest

from mcore_rl.data import BadRowError, PromptLoader, load_prompts
from mcore_rl.toy import build_toy_tokenizer

pytestmark = pytest.mark.train

# Renders to characters the toy vocabulary has, so the ids can be checked by hand:
# <s>=1, '0'..'9' = 4..13, ':' = 14.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}:{% endif %}")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    t = build_toy_tokenizer(tmp_path_factory.mktemp("tok"))
    t.chat_template = CHAT_TEMPLATE
    return t


def write_jsonl(path, rows, raw_lines=()):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return str(path)


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


VERL_ROWS = [
    {"data_source": "gsm8k", "prompt": [{"role": "user", "content": "12"}],
     "reward_model": {"style": "rule", "ground_truth": "3"}, "extra_info": {"index": 0}},
    {"data_source": "gsm8k", "prompt": [{"role": "system", "content": "0"}, {"role": "user", "content": "45"}],
     "reward_model": {"style": "rule", "ground_truth": "9"}, "extra_info": {"index": 1}},
]


# ------------------------------------------------------------------------------------------- sources


def test_toy_source_is_generated_and_deterministic(tok):
    a = load_prompts("toy", tokenizer=tok, toy_size=50, seed=3)
    b = load_prompts("toy", toy_size=50, seed=3)
    assert len(a) == 50 and a.bad_rows == []
    assert [s.prompt for s in a] == [s.prompt for s in b]
    s = a[0]
    assert len(s.prompt) == 2 and s.prompt[1] == ":" and s.ground_truth == s.prompt[0]
    assert s.input_ids == [1, 4 + int(s.prompt[0]), 14]  # <s> digit ':'
    assert [s.prompt for s in load_prompts("toy", toy_size=50, seed=4)] != [s.prompt for s in a]


def test_parquet_verl_layout_with_chat_template(tmp_path, tok):
    path = write_parquet(tmp_path / "train.parquet", VERL_ROWS)
    ds = load_prompts(path, tokenizer=tok)
    assert len(ds) == 2
    assert ds[0].prompt == "<s>12:" and ds[0].input_ids == [1, 5, 6, 14]  # no second <s>
    assert ds[1].prompt == "<s>045:" and ds[1].input_ids == [1, 4, 8, 9, 14]
    assert [s.ground_truth for s in ds] == ["3", "9"]
    assert ds[0].raw_prompt == [{"role": "user", "content": "12"}]
    assert ds[1].extra == {"data_source": "gsm8k", "extra_info": {"index": 1}}
    assert ds[1].where == f"{path} row 1"
    # a folder with <split>.parquet files, as verl's preprocessing scripts write them
    assert [s.prompt for s in load_prompts(str(tmp_path), split="train", tokenizer=tok)] == ["<s>12:", "<s>045:"]


def test_jsonl_strings_answer_key_and_optional_template(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "7:", "answer": "x #### 7"},
                                              {"question": "12:", "answer": "#### 2"}])
    ds = load_prompts(path, prompt_key="question", tokenizer=tok)
    assert [s.prompt for s in ds] == ["7:", "12:"]
    assert [s.ground_truth for s in ds] == ["x #### 7", "#### 2"]  # 'answer' found by default
    assert ds[0].input_ids == [1, 11, 14]  # the tokenizer's own <s>
    assert ds[1].where == f"{path}:2 (row 1)"
    templated = load_prompts(path, prompt_key="question", tokenizer=tok, apply_chat_template=True)
    assert templated[0].prompt == "<s>7::" and templated[0].input_ids == [1, 11, 14, 14]
    # without a tokenizer: text only
    assert load_prompts(path, prompt_key="question")[0].input_ids is None


def test_toy_files_roundtrip(tmp_path):
    from mcore_rl.toy import write_toy_files

    path = write_toy_files(tmp_path, n=20, seed=2)
    assert [(s.prompt, s.ground_truth) for s in load_prompts(path)] == \
        [(s.prompt, s.ground_truth) for s in load_prompts("toy", toy_size=20, seed=2)]


def test_nested_answer_key_and_list_of_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "1:", "meta": {"gt": {"v": 1}}}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "2:", "meta": {"gt": {"v": 2}}}])
    ds = load_prompts([a, b], answer_key="meta.gt.v")
    assert [s.ground_truth for s in ds] == [1, 2]


def test_hf_save_to_disk_folder(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"prompt": "3:", "answer": "3"}, {"prompt": "4:", "answer": "4"}]),
        "test": datasets.Dataset.from_list([{"prompt": "5:", "answer": "5"}]),
    })
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [s.prompt for s in load_prompts(str(tmp_path / "dd"), tokenizer=tok)] == ["3:", "4:"]  # train default
    test = load_prompts(str(tmp_path / "dd"), split="test")
    assert [(s.prompt, s.ground_truth) for s in test] == [("5:", "5")] and "[test] row 0" in test[0].where
    with pytest.raises(ValueError, match="no split 'valid'"):
        load_prompts(str(tmp_path / "dd"), split="valid")
    dd["train"].save_to_disk(str(tmp_path / "single"))
    assert len(load_prompts(str(tmp_path / "single"))) == 2


# ------------------------------------------------------------------------------------------- bad rows


def _bad_file(tmp_path):
    return write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "1:", "answer": "1"},          # row 0 ok
        {"text": "2:", "answer": "2"},            # row 1 no prompt column
        {"prompt": "   ", "answer": "3"},         # row 2 empty
        {"prompt": "1234567890:", "answer": "0"},  # row 3 too long (12 tokens)
        {"prompt": [], "answer": "4"},            # row 4 empty messages
        {"prompt": [{"content": "5"}]},           # row 5 message without a role
    ], raw_lines=['{"prompt": "6:", broken'])    # row 6 undecodable


def test_bad_rows_skipped_and_reported(tmp_path, tok, caplog):
    path = _bad_file(tmp_path)
    with caplog.at_level(logging.WARNING):
        ds = load_prompts(path, tokenizer=tok, max_prompt_length=8)
    assert [s.prompt for s in ds] == ["1:"]
    rows = [b.where for b in ds.bad_rows]
    assert rows == [f"{path}:{i + 1} (row {i})" for i in range(1, 7)]
    reasons = [b.reason for b in ds.bad_rows]
    assert "no prompt column 'prompt'" in reasons[0] and "text, answer" in reasons[0]
    assert "empty prompt" in reasons[1]
    assert "12 tokens" in reasons[2] and "max_prompt_length=8" in reasons[2]
    assert "empty message list" in reasons[3]
    assert "not a {role, content} dict" in reasons[4]
    assert "cannot parse" in reasons[5]
    assert "skipped 6 bad prompt rows" in caplog.text and f"{path}:3 (row 2)" in caplog.text


def test_bad_row_fatal_names_file_and_row(tmp_path, tok):
    path = _bad_file(tmp_path)
    with pytest.raises(BadRowError) as e:
        load_prompts(path, tokenizer=tok, max_prompt_length=8, on_bad_row="error")
    assert str(e.value).startswith(f"{path}:2 (row 1)") and "no prompt column" in str(e.value)


def test_bad_rows_in_parquet_name_the_row(tmp_path, tok):
    path = write_parquet(tmp_path / "p.parquet", [{"prompt": "1:"}, {"prompt": ""}, {"prompt": "3:"}])
    with pytest.raises(BadRowError, match=r"p\.parquet row 1: empty prompt"):
        load_prompts(path, on_bad_row="error")
    ds = load_prompts(path)
    assert [s.prompt for s in ds] == ["1:", "3:"]
    assert str(ds.bad_rows[0]) == f"{path} row 1: empty prompt in column 'prompt'"


def test_chat_template_failure_is_bad_row(tmp_path, tok):
    import copy

    strict = copy.deepcopy(tok)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('no system role') }}{% endif %}{{ m['content'] }}{% endfor %}")
    path = write_parquet(tmp_path / "v.parquet", VERL_ROWS)
    ds = load_prompts(path, tokenizer=strict)
    assert [s.prompt for s in ds] == ["12"]
    msg = str(ds.bad_rows[0])
    assert msg.startswith(f"{path} row 1: chat template failed") and "no system role" in msg


def test_explicit_answer_key_missing_is_bad_row(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "1:", "gt": "1"}, {"prompt": "2:"}])
    ds = load_prompts(path, answer_key="gt")
    assert len(ds) == 1 and ds.bad_rows[0].where.endswith("(row 1)") and "'gt'" in ds.bad_rows[0].reason


def test_config_errors(tmp_path, tok):
    path = write_parquet(tmp_path / "m.parquet", VERL_ROWS)
    with pytest.raises(ValueError, match="pass a tokenizer"):
        load_prompts(path)
    with pytest.raises(ValueError, match="max_prompt_length is in tokens"):
        load_prompts(path, max_prompt_length=3)
    with pytest.raises(FileNotFoundError, match="nothing_here.parquet"):
        load_prompts(str(tmp_path / "nothing_here.parquet"))
    with pytest.raises(ValueError, match="on_bad_row"):
        load_prompts("toy", on_bad_row="ignore")
    only_bad = write_jsonl(tmp_path / "e.jsonl", [{"prompt": ""}])
    with pytest.raises(ValueError, match="no usable prompts.*empty prompt"):
        load_prompts(only_bad)


# ------------------------------------------------------------------------------------------- loader


def test_loader_batches_shuffle_and_epochs():
    data = list(range(10))
    loader = PromptLoader(data, train_batch_size=4, seed=7)
    assert loader.steps_per_epoch == 2  # the incomplete last batch is dropped
    epoch0 = [loader.next_batch() for _ in range(2)]
    epoch1 = [loader.next_batch() for _ in range(2)]
    assert loader.epoch == 1
    assert all(len(b) == 4 for b in epoch0 + epoch1)
    assert len(set(sum(epoch0, []))) == 8  # no repeats within an epoch
    assert sum(epoch0, []) != sum(epoch1, [])  # reshuffled per epoch
    again = PromptLoader(data, train_batch_size=4, seed=7)
    assert [again.next_batch() for _ in range(4)] == epoch0 + epoch1  # deterministic
    other = PromptLoader(data, train_batch_size=4, seed=8)
    assert [other.next_batch() for _ in range(2)] != epoch0
    plain = PromptLoader(data, train_batch_size=4, shuffle=False)
    assert [plain.next_batch() for _ in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]
    five = PromptLoader(data, train_batch_size=5, shuffle=False)
    assert [five.next_batch() for _ in range(4)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]] * 2


def test_loader_dp_shards_disjoint_and_cover_global_batch():
    data = list(range(50))
    glob = PromptLoader(data, train_batch_size=12, seed=1)
    ranks = [PromptLoader(data, train_batch_size=12, seed=1, dp_rank=r, dp_size=4) for r in range(4)]
    for _ in range(7):  # crosses an epoch boundary (4 steps per epoch)
        g = glob.next_batch()
        shards = [rk.next_batch() for rk in ranks]
        assert all(len(s) == 3 for s in shards)
        assert sum(shards, []) == g  # disjoint, in order, covering the global batch


def test_loader_resume_equals_uninterrupted():
    data = list(range(23))
    full = PromptLoader(data, train_batch_size=6, seed=5)
    expected = [full.next_batch() for _ in range(9)]

    first = PromptLoader(data, train_batch_size=6, seed=5)
    got = [first.next_batch() for _ in range(4)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    assert state["epoch"] == 1 and state["position"] == 1
    resumed = PromptLoader(data, train_batch_size=6, seed=5)
    resumed.load_state_dict(state)
    got += [resumed.next_batch() for _ in range(5)]
    assert got == expected

    # resumed on 2 DP ranks: the same global batches continue
    halves = [PromptLoader(data, train_batch_size=6, seed=5, dp_rank=r, dp_size=2) for r in range(2)]
    for h in halves:
        h.load_state_dict(state)
    assert [sum((h.next_batch() for h in halves), []) for _ in range(5)] == expected[4:]

    with pytest.raises(ValueError, match="seed=5 but this loader has 6"):
        PromptLoader(data, train_batch_size=6, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="dataset_size"):
        PromptLoader(data[:-1], train_batch_size=6, seed=5).load_state_dict(state)


def test_loader_config_errors():
    with pytest.raises(ValueError, match="not divisible by dp_size=4"):
        PromptLoader(list(range(10)), train_batch_size=6, dp_size=4)
    with pytest.raises(ValueError, match="fewer than train_batch_size"):
        PromptLoader(list(range(3)), train_batch_size=4)
    with pytest.raises(ValueError, match="bad DP layout"):
        PromptLoader(list(range(10)), train_batch_size=4, dp_rank=2, dp_size=2)


def test_loader_over_loaded_prompts(tmp_path, tok):
    ds = load_prompts("toy", tokenizer=tok, toy_size=40)
    loader = PromptLoader(ds, train_batch_size=8, seed=0, dp_rank=1, dp_size=2)
    batch = loader.next_batch()
    assert len(batch) == 4 and all(s.input_ids[-1] == 14 for s in batch)
