"""The published evaluation protocols, and a recipe's eval settings held against the one it cites.

A student's AIME number is only comparable to a paper's under the paper's protocol: sampling
temperature and top-p, the token budget (reasoning models cut at 8k score far below their 32k
numbers), and how many samples per problem pass@1 averages (more samples: the same expectation,
less noise; AIME has 30 problems). Each protocol below says where it was read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distill.check.verdicts import Verdict, error, ok, warning

CHECK = "protocol"


@dataclass(frozen=True)
class Protocol:
    temperature: float
    top_p: float
    max_tokens: int
    samples: dict[str, int]            # responses per problem that pass@1 averages, by benchmark
    source: str
    top_k: int | None = None
    max_tokens_for: dict[str, int] = field(default_factory=dict)  # a longer budget for some benchmarks
    note: str = ""


PROTOCOLS = {
    "deepseek-r1": Protocol(
        0.6, 0.95, 32768, {"aime24": 64, "math500": 64},
        "DeepSeek-R1 paper (arXiv 2501.12948, sec. 3, 'Evaluation Setup') and github.com/deepseek-ai/DeepSeek-R1 "
        "README ('Evaluation Results'): 32,768 tokens, temperature 0.6, top-p 0.95, 64 responses per query",
        note="the paper says k is 'typically between 4 and 64, depending on the test set size'; the README says 64"),
    "open-r1": Protocol(
        0.6, 0.95, 32768, {"aime24": 64, "math500": 4, "gpqa": 8, "livecodebench": 16},
        "github.com/huggingface/open-r1 README ('Evaluating models', 'Reproducing Deepseek's evaluation results', "
        "commit 1416fa0): lighteval on vLLM, max_new_tokens 32768, temperature 0.6, top_p 0.95"),
    "qwen3-thinking": Protocol(
        0.6, 0.95, 32768, {"aime24": 64, "aime25": 64},
        "Qwen3 Technical Report (arXiv 2505.09388, sec. 4.6): thinking mode at temperature 0.6, top-p 0.95, "
        "top-k 20, 32,768 output tokens (38,912 for AIME'24/'25), 64 samples per AIME question",
        top_k=20, max_tokens_for={"aime24": 38912, "aime25": 38912}),
    "thinking-machines": Protocol(
        1.0, 1.0, 64000, {},
        "github.com/thinking-machines-lab/tinker-cookbook tinker_cookbook/recipes/distillation/README.md "
        "(commit ca232b08): AIME'24 'evaluated with temperature=1.0, top_p=1.0, top_k=-1, and max_tokens=64000'",
        note="stated for the cookbook's reruns of the On-Policy Distillation post; samples per problem not stated"),
}


@dataclass(frozen=True)
class Published:
    model: str
    scores: dict[str, float]           # benchmark -> pass@1 (%)
    protocol: str
    source: str
    recipe: str = ""


#: Numbers a distill run may want to reproduce, each read from its source.
PUBLISHED = [
    Published("DeepSeek-R1-Distill-Qwen-1.5B", {"aime24": 28.9, "math500": 83.9}, "deepseek-r1",
              "DeepSeek-R1 paper, Table 5 (and the repository README)",
              "Qwen2.5-Math-1.5B fine-tuned on 800k samples curated with DeepSeek-R1"),
    Published("DeepSeek-R1-Distill-Qwen-7B", {"aime24": 55.5, "math500": 92.8}, "deepseek-r1",
              "DeepSeek-R1 paper, Table 5", "Qwen2.5-Math-7B on the same 800k samples"),
    Published("OpenR1-Distill-7B", {"aime24": 52.7, "math500": 89.0}, "open-r1",
              "open-r1 README, 'SFT' (recipes/OpenR1-Distill-7B/sft/config_distill.yaml)",
              "open-r1/Qwen2.5-Math-7B-RoPE-300k (RoPE base 300k for 32k context), Mixture-of-Thoughts (350k "
              "R1 traces), lr 4e-5 cosine (min 10%), 5 epochs, max_length 32768, 8 x H100"),
    Published("Qwen3-8B, off-policy then on-policy distillation", {"aime24": 74.4}, "qwen3-thinking",
              "Qwen3 Technical Report, Table 21",
              "from the same off-policy distilled checkpoint (AIME'24 55.0): on-policy distillation 74.4 in 1,800 "
              "GPU hours against RL's 67.6 in 17,920 (about 1/10); teachers Qwen3-32B or Qwen3-235B-A22B"),
]


def benchmark(task: str) -> str:
    """distill's task names to the protocols' benchmark names: ``distill_aime24`` -> ``aime24``."""
    return task.removeprefix("distill_")


def find_protocol(cited: str) -> tuple[str, Protocol] | None:
    """A protocol by its name or by the name of a published model evaluated under it."""
    key = cited.strip().lower()
    if key in PROTOCOLS:
        return key, PROTOCOLS[key]
    for row in PUBLISHED:
        if row.model.lower() == key:
            return row.protocol, PROTOCOLS[row.protocol]
    return None


def check_protocol(cited: str, *, tasks: list[str], temperature: float, top_p: float, max_tokens: int,
                   samples: dict[str, int] | None = None) -> list[Verdict]:
    """The recipe's eval settings against the protocol of the numbers it cites; one warning per difference.

    ``samples``: k per task as the eval will run it (None: not known here, not compared).
    """
    found = find_protocol(cited)
    if found is None:
        known = ", ".join([*PROTOCOLS, *(row.model for row in PUBLISHED)])
        return [error(CHECK, f"no published protocol '{cited}' (known: {known})", "name one of those")]
    name, protocol = found
    out = []
    for setting, ours, theirs, flag in (("temperature", temperature, protocol.temperature, "--temperature"),
                                        ("top-p", top_p, protocol.top_p, "--top-p")):
        if abs(ours - theirs) > 1e-9:
            out.append(warning(CHECK, f"eval {setting} {ours:g}, {name} sampled at {theirs:g}: pass@1 moves with it, "
                                      f"so the numbers are not comparable", f"{flag} {theirs:g}"))
    if protocol.top_k is not None:
        out.append(warning(CHECK, f"{name} sampled with top-k {protocol.top_k}; distill eval sets none",
                           f"over a server, serve the model with top_k {protocol.top_k} (vLLM takes it from the "
                           f"model's generation_config.json, which Qwen3's sets)"))
    for task in tasks:
        bench = benchmark(task)
        budget = protocol.max_tokens_for.get(bench, protocol.max_tokens)
        if max_tokens < budget:
            out.append(warning(CHECK, f"{task}: answers cut at {max_tokens:,} tokens where {name} allowed {budget:,}: "
                                      f"long reasoning is cut and scored wrong", f"--max-tokens {budget}"))
        elif max_tokens > budget:
            out.append(warning(CHECK, f"{task}: {max_tokens:,} tokens allowed where {name} allowed {budget:,}: answers "
                                      f"{name} cut off can count here", f"--max-tokens {budget}"))
        k, wanted = (samples or {}).get(task), protocol.samples.get(bench)
        if k is not None and wanted is not None and k < wanted:
            out.append(warning(CHECK, f"{task}: pass@1 over {k} samples per problem where {name} averaged {wanted}: "
                                      f"the same expectation, a noisier estimate", f"--k {wanted}"))
    note = f" ({protocol.note})" if protocol.note else ""
    if not out:
        out.append(ok(CHECK, f"the eval settings match {name}'s protocol: {protocol.source}{note}"))
    return out
