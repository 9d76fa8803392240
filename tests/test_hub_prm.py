"""Hub PRM families (evaluator/hub_prm.py) on tiny random checkpoints in each family's on-disk layout
(tests/hub_prm_fixtures.py): family detection, scores against a hand-written reference of each model
card's recipe (full sequences, one at a time, through the full model), partial scoring, the compute
counts, and one end-to-end ``frugal eval`` per family."""

from __future__ import annotations

import json

import pytest
import torch
from hub_prm_fixtures import BUILDERS

from frugal.evaluator.prm_counts import CountingPRM
from frugal.evaluator.flops import prm_shape
from frugal.evaluator.hub_prm import HubPRM, detect_family, load_any_prm

PROMPTS = ["What is 3 + 4 * 5?", "What is 3 + 4 * 5?", "What is 2 + 2?", "What is 3 + 4 * 5?"]
STEPS = [["4 * 5 = 20", "3 + 20 = 23", "The answer is \\boxed{23}."], ["4 * 5 = 21"], ["2 + 2 = 4", "so 4"],
         ["4 * 5 = 20", "3 + 20 = 24"]]


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request, tmp_path_factory):
    folder = BUILDERS[request.param](tmp_path_factory.mktemp(request.param) / "ckpt")
    return request.param, folder


# ---------------------------------------------------------------------- the model cards' recipes, by hand

def qwen_reference(folder, prompt, steps):
    """Qwen2.5-Math-PRM's model card: Qwen2ForProcessRewardModel = Qwen2Model + score head, loaded strictly
    from the checkpoint's keys; softmax(logits)[..., 1] at every <extra_0>."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Qwen2Config, Qwen2Model

    tok = AutoTokenizer.from_pretrained(folder)
    config = Qwen2Config.from_pretrained(folder)

    class Qwen2ForProcessRewardModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Qwen2Model(config)
            h = config.hidden_size
            self.score = torch.nn.Sequential(torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, 2))

    ref = Qwen2ForProcessRewardModel()
    ref.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    messages = [{"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."},
                {"role": "user", "content": prompt}, {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"}]
    conversation = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    input_ids = tok.encode(conversation, return_tensors="pt")
    with torch.no_grad():
        logits = ref.score(ref.model(input_ids=input_ids).last_hidden_state)
    probabilities = torch.softmax(logits, dim=-1)[0]
    mask = input_ids[0] == tok.encode("<extra_0>")[0]
    return probabilities[mask][:, 1].tolist()


def shepherd_reference(folder, prompt, steps):
    """math-shepherd-mistral-7b-prm's model card: candidate tokens encode('+ -')[1:], tag encode('ки')[-1],
    softmax over the two logits at the tags, taking '+'."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    candidate_tokens = tok.encode("+ -")[1:]
    step_tag_id = tok.encode("ки")[-1]
    output = "\n\n".join(f"{s} ки" for s in steps)
    input_id = torch.tensor([tok.encode(f"{prompt} {output}")])
    with torch.no_grad():
        logits = model(input_id).logits[:, :, candidate_tokens]
    scores = logits.softmax(dim=-1)[:, :, 0]
    return scores[input_id == step_tag_id].tolist()


def rlhflow_reference(folder, prompt, steps):
    """RLHFlow's prm_evaluate.py: the conversation grown one (user step, assistant '+') pair at a time,
    P(+) vs '-' from the logits at position -3 (which predict the '+')."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    candidate_tokens = [tok.encode("+")[-1], tok.encode("-")[-1]]
    conversation, out = [], []
    for k, step in enumerate(steps):
        conversation.append({"content": prompt + " " + step if k == 0 else step, "role": "user"})
        conversation.append({"content": "+", "role": "assistant"})
        input_ids = tok.apply_chat_template(conversation, return_tensors="pt", return_dict=False)
        with torch.no_grad():
            logits = model(input_ids).logits[:, -3, candidate_tokens]
        out.append(logits.softmax(dim=-1)[0, 0].item())
    return out


REFERENCES = {"qwen2_math_prm": qwen_reference, "math_shepherd": shepherd_reference, "rlhflow": rlhflow_reference}


# ---------------------------------------------------------------------- tests

def test_family_is_detected_from_the_checkpoint(family):
    name, folder = family
    assert detect_family(folder) == name
    assert "auto_map" not in json.loads((folder / "config.json").read_text()) or name == "qwen2_math_prm"


def test_scores_match_the_model_card_recipe(family):
    name, folder = family
    prm = load_any_prm(str(folder), name, torch.device("cpu"), "float32")
    assert isinstance(prm, HubPRM)
    want = [REFERENCES[name](folder, p, s) for p, s in zip(PROMPTS, STEPS)]
    for share in (True, False):
        got = prm.score(PROMPTS, STEPS, share_prompt=share)
        for g, w in zip(got, want):
            assert len(g) == len(w)
            assert g == pytest.approx(w, abs=1e-5)
    flat = [x for w in want for x in w]
    assert max(flat) - min(flat) > 0.01  # the random checkpoint's scores differ: the test can tell positions apart


def test_partial_scoring_counts_a_trailing_open_step(family):
    name, folder = family
    prm = load_any_prm(str(folder), name, torch.device("cpu"), "float32")
    texts = ["4 * 5 = 20\n\n3 + 20 = 2", "4 * 5 = 20\n\n", ""]
    got = prm.score_partial(PROMPTS[:3], texts)
    assert got[0] == pytest.approx(prm.score([PROMPTS[0]], [["4 * 5 = 20", "3 + 20 = 2"]])[0], abs=1e-6)
    assert len(got[1]) == 1 and got[2] == []


def test_prompt_sharing_runs_fewer_tokens_and_counts_them(family):
    name, folder = family
    prm = load_any_prm(str(folder), name, torch.device("cpu"), "float32")
    full = [len(prm.encode(p, s).ids) for p, s in zip(PROMPTS, STEPS)]
    prm.score(PROMPTS, STEPS, share_prompt=False)
    assert prm.last_tokens == sum(full) and prm.last_attention == sum(n * (n + 1) // 2 for n in full)
    prm.score(PROMPTS, STEPS)
    assert prm.last_tokens < sum(full)  # three solutions of one prompt: its shared prefix ran once
    counting = CountingPRM(prm)
    counting.score_partial(PROMPTS, ["\n\n".join(s) for s in STEPS])
    assert counting.counts.prefill == prm.last_tokens and counting.counts.attention == prm.last_attention
    shape = prm_shape(prm)
    body = prm.body
    assert shape.params == sum(p.numel() for p in body.parameters()) - body.get_input_embeddings().weight.numel() + (
        sum(p.numel() for p in prm.head.parameters()))
    assert shape.head == 0


def test_sharded_qwen_checkpoint_and_bfloat16(tmp_path):
    from hub_prm_fixtures import qwen_math_prm

    one = load_any_prm(str(qwen_math_prm(tmp_path / "one")), None, torch.device("cpu"), "float32")
    sharded = load_any_prm(str(qwen_math_prm(tmp_path / "sharded", shards=3)), None, torch.device("cpu"), "float32")
    assert sharded.score(PROMPTS, STEPS) == one.score(PROMPTS, STEPS)
    low = load_any_prm(str(tmp_path / "one"), None, torch.device("cpu"), "bfloat16")
    for a, b in zip(low.score(PROMPTS, STEPS), one.score(PROMPTS, STEPS)):
        assert a == pytest.approx(b, abs=0.05)


def test_unknown_architecture_names_the_families(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="prm_family=frugal|qwen2_math_prm"):
        detect_family(tmp_path)


@pytest.mark.parametrize("name, search", [("qwen2_math_prm", ["search=best_of_n"]),
                                          ("math_shepherd", ["search=particle_filter"]),  # partial scores each step
                                          ("rlhflow", ["search=dvts", "search.beam_width=1"])])
def test_frugal_eval_end_to_end_per_family(name, search, tmp_path):
    from test_configs import compose_recipe

    from frugal.recipes.eval import run

    folder = BUILDERS[name](tmp_path / name)
    summary = run(compose_recipe("eval", ["model=tiny_random", *search, "search.budgets=[2]", "limit=2",
                                          "task=arith", "engine.max_new_tokens=8", "num_threads=1", "plots=false",
                                          "progress=false", f"prm_path={folder}"]), run_dir=tmp_path / "run")
    row = summary["rows"][0]
    assert row["prm_tokens"] > 0 and row["flops_prm"] > 0 and row["problems"] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert all(c["scores"] and all(0 < s < 1 for s in c["scores"]) for r in records for c in r["candidates"]
               if c["text"].strip())
