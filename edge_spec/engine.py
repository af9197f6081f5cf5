"""Loads a target and its drafters, and runs generations: what the CLI and apps talk to."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from . import models
from .chat_template import render
from .controller import Controller
from .runtime import Runtime
from .types import SamplingParams, Step

Progress = Callable[[str, float], None]  # (what, fraction done)


@dataclass(frozen=True)
class EngineOptions:
    """Every default of the engine lives here; the CLI reads them."""

    model: str | None = None        # path or registry name; None = the default target
    draft: str | None = None        # path or registry name; None = default drafter with the default target
    ngram: bool = True              # n-gram (prompt lookup) drafting, tried before the draft model
    draft_model: bool = True        # False: no draft model even if one would be chosen
    plain: bool = False             # no speculation at all: the baseline
    n_ctx: int = 4096
    n_threads: int | None = None    # target threads; None = physical cores
    n_threads_draft: int | None = None
    n_gpu_layers: int = 0
    n_gpu_layers_draft: int = 0
    type_k: str = "f16"
    type_v: str = "f16"
    max_draft: int = 16
    calibrate: bool = True          # measure the verification cost curve (cached per machine)


def resolve_model(name: str | None, default: str) -> Path:
    if name is None:
        return models.require(default)
    if name in models.MODELS:
        return models.require(name)
    return Path(name).expanduser()


class Engine:
    def __init__(self, target, draft_backend, runtime: Runtime, options: EngineOptions):
        self.target, self.draft_backend = target, draft_backend
        self.runtime, self.options = runtime, options

    @classmethod
    def load(cls, options: EngineOptions = EngineOptions(), progress: Progress | None = None) -> "Engine":
        from .backends.llama_cpp import LlamaCppBackend, LlamaOptions
        from .drafters import ModelDrafter, NgramDrafter
        from .vocab import check_compatible

        report = progress or (lambda what, fraction: None)
        target_path = resolve_model(options.model, models.DEFAULT_TARGET)
        draft_path = None
        if not options.plain and options.draft_model:
            if options.draft is not None:
                draft_path = resolve_model(options.draft, models.DEFAULT_DRAFT)
            elif options.model is None:
                draft_path = resolve_model(None, models.DEFAULT_DRAFT)

        target = LlamaCppBackend(target_path, LlamaOptions(
            n_ctx=options.n_ctx, n_threads=options.n_threads, n_gpu_layers=options.n_gpu_layers,
            type_k=options.type_k, type_v=options.type_v), lambda f: report("loading target", f))
        drafters, draft_backend = [], None
        try:
            if draft_path is not None:
                draft_backend = LlamaCppBackend(draft_path, LlamaOptions(
                    n_ctx=options.n_ctx, n_threads=options.n_threads_draft or options.n_threads,
                    n_gpu_layers=options.n_gpu_layers_draft, type_k=options.type_k, type_v=options.type_v),
                    lambda f: report("loading drafter", f))
                check_compatible(target, draft_backend)
            if not options.plain and options.ngram:
                drafters.append(NgramDrafter())
            if draft_backend is not None:
                drafters.append(ModelDrafter(draft_backend))
            controller = Controller(max_draft=options.max_draft)
            if options.calibrate and drafters:
                _calibrate(controller, target, draft_backend, options.max_draft, report)
        except BaseException:
            target.close()
            if draft_backend is not None:
                draft_backend.close()
            raise
        return cls(target, draft_backend, Runtime(target, drafters, controller), options)

    # --- prompts -------------------------------------------------------------------------
    def chat_tokens(self, messages: Sequence[dict]) -> list[int]:
        """Render messages with the model's chat template and tokenize (special tokens parsed)."""
        facts = self.target.facts
        bos = self.target.token_text(facts.bos) if facts.bos >= 0 else ""
        eos = self.target.token_text(facts.eos) if facts.eos >= 0 else ""
        text = render(facts.chat_template, list(messages), bos=bos, eos=eos)
        add_bos = facts.extra.get("add_bos", False) and not (bos and text.startswith(bos))
        return self.target.tokenize(text, add_special=add_bos, parse_special=True)

    def text_tokens(self, text: str) -> list[int]:
        return self.target.tokenize(text, add_special=True, parse_special=False)

    # --- generation ----------------------------------------------------------------------
    def stream(self, prompt: Sequence[int], sp: SamplingParams = SamplingParams(),
               cancel: threading.Event | None = None) -> Iterator[Step]:
        return self.runtime.generate(prompt, sp, cancel)

    def close(self) -> None:
        self.target.close()
        if self.draft_backend is not None:
            self.draft_backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _calibrate(controller: Controller, target, draft_backend, max_draft: int, report: Progress) -> None:
    """Seed the controller with measured costs: target passes of 1..max_draft+1 tokens and one
    drafter step. Cached on disk, so only the first run on a machine pays for it."""
    from .calibrate import verify_costs

    costs = verify_costs(target, max_draft + 1,
                         progress=lambda n, total: report("measuring verification cost", n / total))
    drafts = {}
    if draft_backend is not None:
        drafts["model"] = verify_costs(draft_backend, 1, progress=lambda n, total: report("measuring drafter", 1.0))[1]
    controller.calibrate(costs, drafts)

