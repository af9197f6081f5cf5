"""edgespec: lossless speculative decoding for local LLMs on the hardware people own.

    import edge_spec
    with edge_spec.load() as session:
        print(session.generate("Hello!", temperature=0).text)
"""

from edge_spec.types import Draft, EdgespecError, Grammar, ModelFacts, SamplingParams, Stats, Step, Verdict

__version__ = "0.1.0"
__all__ = ["Completion", "Draft", "EdgespecError", "Grammar", "ModelFacts", "SamplingParams", "Session", "Stats",
           "Step", "Verdict", "load"]


def __getattr__(name: str):
    if name in ("load", "Session", "Completion"):
        # the API pulls in the engine and planner: imported on first use, so `import edge_spec`
        # and the CLI's startup stay light
        from edge_spec.surfaces import api

        return getattr(api, name)
    raise AttributeError(f"module 'edge_spec' has no attribute {name!r}")
