"""The published evaluation protocols, and the numbers each produced.

A student's AIME number is only comparable to a paper's under the paper's protocol: sampling
temperature, top-p and top-k, the token budget (reasoning models cut at 8k score far below their
32k numbers), and how many samples per problem pass@1 averages (more samples: the same
expectation, less noise; AIME has 30 problems). Each protocol below says where it was read.

``distill eval --protocol NAME`` samples as the protocol did (its settings laid under the flags,
``config.build``'s ``PRESETS``: a flag still wins, with a note), records it in ``results.json``, and
``compare`` shows it beside each row; ``distill check`` holds a recipe's eval against the protocol of
the numbers it cites.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Protocol:
    temperature: float
    top_p: float
    max_tokens: int
    samples: dict[str, int]            # responses per problem that pass@1 averages, by benchmark
    source: str
    top_k: int = 0                     # 0: every token (the protocol restricts none)
    n: int | None = None               # responses per problem on benchmarks ``samples`` does not name
    max_tokens_for: dict[str, int] = field(default_factory=dict)  # a longer budget for some benchmarks
    note: str = ""

    def options(self) -> dict:
        """The option values it sets for a whole evaluation (flag keys)."""
        out = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "max_tokens": self.max_tokens}
        return {**out, "n": self.n} if self.n else out

    def for_task(self, task: str) -> dict:
        """The values it sets for one task's benchmark of its own (its k, a longer budget)."""
        bench = benchmark(task)
        out = {"n": self.samples[bench]} if bench in self.samples else {}
        return {**out, "max_tokens": self.max_tokens_for[bench]} if bench in self.max_tokens_for else out


PROTOCOLS = {
    "deepseek-r1": Protocol(
        0.6, 0.95, 32768, {"aime24": 64, "math500": 64},
        "DeepSeek-R1 paper (arXiv 2501.12948, sec. 3, 'Evaluation Setup') and github.com/deepseek-ai/DeepSeek-R1 "
        "README ('Evaluation Results', commit 0cf7856): 32,768 tokens, temperature 0.6, top-p 0.95, 64 responses per "
        "query", n=64,
        note="the paper says k is 'typically between 4 and 64, depending on the test set size'; the README says 64"),
    "open-r1": Protocol(
        0.6, 0.95, 32768, {"aime24": 64, "math500": 4, "gpqa": 8, "livecodebench": 16},
        "github.com/huggingface/open-r1 README ('Evaluating models', 'Reproducing Deepseek's evaluation results', "
        "commit 1416fa0): lighteval on vLLM, max_new_tokens 32768, temperature 0.6, top_p 0.95; 64 responses per "
        "AIME 2024 problem, 4 per MATH-500 problem"),
    "qwen3-thinking": Protocol(
        0.6, 0.95, 32768, {"aime24": 64, "aime25": 64},
        "Qwen3 Technical Report (arXiv 2505.09388, sec. 4.6): thinking mode at temperature 0.6, top-p 0.95, "
        "top-k 20, 32,768 output tokens (38,912 for AIME'24/'25), 64 samples per AIME question",
        top_k=20, max_tokens_for={"aime24": 38912, "aime25": 38912}),
    "thinking-machines": Protocol(
        1.0, 1.0, 64000, {},
        "github.com/thinking-machines-lab/tinker-cookbook tinker_cookbook/recipes/distillation/README.md "
        "(commit ca232b08): AIME'24 'evaluated with temperature=1.0, top_p=1.0, top_k=-1, and max_tokens=64000'",
        note="stated with the cookbook's Qwen3.5 reruns of the On-Policy Distillation post (commit ca232b08), not for "
             "its Qwen3-8B-Base numbers; samples per problem not stated"),
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
              "DeepSeek-R1 paper, Table 5, and the repository README ('Distilled Model Evaluation')",
              "Qwen2.5-Math-1.5B fine-tuned on 800k samples curated with DeepSeek-R1"),
    Published("DeepSeek-R1-Distill-Qwen-7B", {"aime24": 55.5, "math500": 92.8}, "deepseek-r1",
              "DeepSeek-R1 paper, Table 5, and the repository README ('Distilled Model Evaluation')",
              "Qwen2.5-Math-7B on the same 800k samples"),
    Published("OpenR1-Distill-7B", {"aime24": 52.7, "math500": 89.0}, "open-r1",
              "open-r1 README, 'SFT distillation' (recipes/OpenR1-Distill-7B/sft/config_distill.yaml, commit 1416fa0)",
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
    published = find_published(cited)
    return (published.protocol, PROTOCOLS[published.protocol]) if published else None


def find_published(model: str) -> Published | None:
    return next((row for row in PUBLISHED if row.model.lower() == model.strip().lower()), None)


def departures(protocol: Protocol, task: str, *, temperature: float, top_p: float, top_k: int, n: int,
               max_tokens: int) -> list[tuple[str, float, float]]:
    """(setting, ours, the protocol's) for each way one task's sampling departs from the protocol in a way
    that changes its numbers: any other temperature, top-p, top-k or budget, and fewer samples per
    problem (more give the same expectation with less noise)."""
    own = {**protocol.options(), **protocol.for_task(task)}
    out = [(key, ours, own[key]) for key, ours in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k),
                                                    ("max_tokens", max_tokens)) if abs(ours - own[key]) > 1e-9]
    if "n" in own and n < own["n"]:
        out.append(("n", n, own["n"]))
    return out
