"""SFT training on tiny real models: it learns, saves loadable models/adapters, resumes, packs."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback

from distill.cli import main
from distill.errors import DistillError
from distill.batching import Collator
from distill.config import make, replace
from distill.runinfo import RUN_RECORD
from distill.train.command import TrainConfig
from distill.train.fit import run_training
from distill.train.trainers import SFTTrainer

from test_train_sft_data import make_trace, write_traces

SUMMARY_KEYS = {"method", "base_model", "teacher", "train_examples", "eval_examples", "tokens_seen", "lora",
                "wall_time_s", "final_train_loss", "final_eval_loss"}


def quick(student, traces, out, **kw) -> TrainConfig:
    """A fast CPU config: no checkpointing overhead, no TensorBoard, a log line every step."""
    base = dict(student=str(student), traces=traces, out=str(out), eval_fraction=0.0, batch_size=2,
                lr=1e-3, warmup_ratio=0.0, logging_steps=1, save_steps=1000, gradient_checkpointing=False,
                report_to="none", max_steps=3)
    return make(TrainConfig, **{**base, **kw})


def losses(out) -> dict[int, float]:
    record = json.loads((out / RUN_RECORD).read_text())
    return {p["step"]: p["loss"] for p in record["loss_curve"] if "loss" in p}


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    """Eight traces of different lengths (so padding and packing differ)."""
    items = [make_trace(i) for i in range(8)]
    for i, t in enumerate(items):
        t["reasoning"] = " ".join(["step"] * (3 * i + 1))
    return write_traces(tmp_path_factory.mktemp("traces") / "traces.jsonl", items)


def greedy(model, tok, prompt: str) -> list[int]:
    inputs = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_cli_training_learns_a_trace_and_saves_a_loadable_model(tmp_path, tiny_llama):
    trace = make_trace(2, reasoning=None) | {"answer": "\\boxed{4}"}
    path = write_traces(tmp_path / "t.jsonl", [trace])
    out = tmp_path / "student"
    rc = main(["train", "--method", "sft", "--student", str(tiny_llama), "--traces", path, "--out", str(out),
               "--max-steps", "40", "--batch-size", "1", "--lr", "1e-2", "--lr-scheduler", "constant",
               "--warmup-ratio", "0", "--eval-fraction", "0", "--logging-steps", "1", "--save-steps", "1000",
               "--no-gradient-checkpointing", "--report-to", "none"])
    assert rc == 0
    record = json.loads((out / RUN_RECORD).read_text())
    summary = record["summary"]
    assert SUMMARY_KEYS <= set(summary)
    assert summary["method"] == "sft" and summary["teacher"] == "teacher-x" and summary["train_examples"] == 1
    assert summary["tokens_seen"] > 0 and record["data"]["traces"]["sha256"]
    assert record["distributed"] == {"kind": "one process", "world_size": 1, "sharded": "nothing", "teacher": None}
    curve = losses(out)
    assert curve[40] < curve[1] / 10, curve
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template
    generated = greedy(model, tok, "What is 2 + 2?")
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert eot in generated, f"the student never stops: {tok.decode(generated)!r}"
    assert tok.decode(generated[:generated.index(eot)]) == "\\boxed{4}"


def test_packed_and_padded_training_give_the_same_losses(tmp_path, tiny_qwen2, traces):
    padded = quick(tiny_qwen2, traces, tmp_path / "padded", batch_size=8)
    packed = quick(tiny_qwen2, traces, tmp_path / "packed", batch_size=1, packing=True, max_length=4096)
    assert run_training(padded) == 0 and run_training(packed) == 0
    a, b = losses(tmp_path / "padded"), losses(tmp_path / "packed")
    assert list(a) == list(b) == [1, 2, 3]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4)
    assert a[3] < a[1]


class StopAt(TrainerCallback):
    """Fault injection: end training after ``step`` optimizer steps, as a crash would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def test_resume_continues_step_count_schedule_and_data_order(tmp_path, tiny_qwen2, traces):
    # 8 traces, batch 2: 4 steps an epoch; stopped in the second epoch, whose length-grouped order
    # the resumed run must draw as the uninterrupted one did
    reference = quick(tiny_qwen2, traces, tmp_path / "ref", max_steps=7, save_steps=5, lr_scheduler="cosine")
    interrupted = replace(reference, out=str(tmp_path / "run"))
    run_training(reference)
    run_training(interrupted, callbacks=[StopAt(5)])  # extra trainer kwargs pass through
    assert (tmp_path / "run" / "checkpoint-5").is_dir() and list(losses(tmp_path / "run")) == [1, 2, 3, 4, 5]
    run_training(replace(interrupted, resume=True))
    done, ref = losses(tmp_path / "run"), losses(tmp_path / "ref")
    assert list(done) == [1, 2, 3, 4, 5, 6, 7]
    for step in (6, 7):
        assert done[step] == pytest.approx(ref[step], rel=1e-5)
    assert json.loads((tmp_path / "run" / RUN_RECORD).read_text())["summary"]["global_step"] == 7


def test_lora_adapter_saves_loads_changes_outputs_and_merges(tmp_path, tiny_qwen2, traces):
    from peft import PeftModel

    out = tmp_path / "lora"
    cfg = quick(tiny_qwen2, traces, out, lora=True, merge=True, lr=1e-2,
                lora_target_modules=["q_proj", "v_proj"], eval_fraction=0.25, eval_steps=2)
    assert run_training(cfg) == 0
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"q_proj", "v_proj"}
    summary = json.loads((out / RUN_RECORD).read_text())["summary"]
    assert summary["lora"] and summary["eval_examples"] == 2 and summary["final_eval_loss"] is not None
    ids = torch.tensor([[1, 42, 43, 44, 45]])
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen2).eval()
    merged_model = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, out).eval()(ids).logits
        merged = merged_model(ids).logits.float()
    assert (tuned - before).abs().max() > 1e-3, "the adapter changes outputs"
    # on a GPU the base trains and merges in bf16: the merged weights are rounded to bf16
    tolerance = 1e-4 if merged_model.dtype == torch.float32 else 3e-2
    torch.testing.assert_close(merged, tuned, atol=tolerance, rtol=tolerance)


class OutOfMemory(TrainerCallback):
    """Fault injection: the first step runs out of GPU memory."""

    def on_step_begin(self, args, state, control, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_says_what_to_lower(tmp_path, tiny_qwen2, traces):
    with pytest.raises(DistillError, match="out of memory.*--batch-size.*--max-length"):
        run_training(quick(tiny_qwen2, traces, tmp_path / "oom"), callbacks=[OutOfMemory()])


@pytest.mark.parametrize("collated_targets", [True, False], ids=["distill-collator", "other-collator"])
def test_chunked_sft_loss_equals_the_models_own_cross_entropy(tmp_path, tiny_qwen2, collated_targets):
    """The trainer's loss (final hidden states, a few tokens at a time) is the model's mean next-token
    cross-entropy over the labelled tokens, with the same gradients, padding and prompts masked;
    with the rows found by the collator (no host sync) or from the labels (another collator's batch)."""
    from transformers import TrainingArguments

    torch.manual_seed(0)
    examples = [{"input_ids": [5, 6, 7, 8, 9, 10], "labels": [-100, -100, 7, 8, 9, 10]},
                {"input_ids": [11, 12, 13], "labels": [-100, 12, 13]}]
    batch = Collator(pad_token_id=0)(examples)
    if not collated_targets:
        del batch["target_index"]
    losses_and_grads = []
    for chunked in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
        if chunked:
            args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
            trainer = SFTTrainer(model=model, args=args)
            trainer.loss_settings.chunk_size = 3  # 6 labelled tokens: two chunks
            loss = trainer.compute_loss(model, batch)
        else:
            loss = model(**{k: v for k, v in batch.items() if k != "target_index"}).loss
        loss.backward()
        losses_and_grads.append((loss.detach(), model.get_output_embeddings().weight.grad,
                                 model.get_input_embeddings().weight.grad))
    for own, ours in zip(*losses_and_grads):
        torch.testing.assert_close(ours, own, atol=1e-5, rtol=1e-4)


def test_gradient_accumulation_gives_the_loss_of_the_whole_batch(tmp_path, tiny_qwen2, traces):
    """Batch 4 in one step == batch 2 x 2 accumulation steps: each token weighs the same (the loss is
    divided by the accumulated batch's token count, not per micro-batch)."""
    whole = quick(tiny_qwen2, traces, tmp_path / "whole", batch_size=4, grad_accum=1, max_steps=1)
    split = quick(tiny_qwen2, traces, tmp_path / "split", batch_size=2, grad_accum=2, max_steps=1)
    assert run_training(whole) == 0 and run_training(split) == 0
    assert losses(tmp_path / "split")[1] == pytest.approx(losses(tmp_path / "whole")[1], rel=1e-4)


def test_resume_skips_a_checkpoint_killed_while_it_was_written(tmp_path):
    """A run killed mid-save leaves checkpoint-N without trainer_state.json: resume takes the one before."""
    from distill.train.fit import last_checkpoint

    for step, complete in ((2, True), (4, True), (6, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert last_checkpoint(str(tmp_path / "nothing-yet")) is None


def test_sigterm_saves_a_checkpoint_and_resume_reaches_the_same_final_step(tmp_path, tiny_llama, traces):
    """What a cluster scheduler does before it kills a job: SIGTERM. The run finishes its step,
    saves a checkpoint, exits 143; --resume continues to the planned last step."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    args = ["train", "--method", "sft", "--student", str(tiny_llama), "--traces", traces, "--out", str(out),
            "--max-steps", "20", "--batch-size", "1", "--eval-fraction", "0", "--logging-steps", "1",
            "--save-steps", "1000", "--no-gradient-checkpointing", "--report-to", "none"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "distill.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in proc.stdout:                  # the first step's log line: training is under way
        if " | loss " in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "SIGTERM" in err and "--resume" in err
    saved = sorted(out.glob("checkpoint-*"))
    assert len(saved) == 1 and (saved[0] / "trainer_state.json").is_file()
    assert 0 < int(saved[0].name.split("-")[1]) < 20 and not (out / RUN_RECORD).exists()
    assert main([*args, "--resume"]) == 0
    assert json.loads((out / RUN_RECORD).read_text())["summary"]["global_step"] == 20
