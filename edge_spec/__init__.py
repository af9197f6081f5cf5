"""edgespec: lossless speculative decoding for local LLMs on the hardware people own."""

from .types import Draft, EdgespecError, ModelFacts, SamplingParams, Stats, Step, Verdict

__version__ = "0.1.0"
__all__ = ["Draft", "EdgespecError", "ModelFacts", "SamplingParams", "Stats", "Step", "Verdict"]
