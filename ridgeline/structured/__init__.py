"""Structured outputs (constrained decoding) with llguidance: what a request asks for
(params.StructuredOutputsParams), the compiled grammars and their token masks per sequence
(masks.GrammarMasks), used by the model runner around each forward pass."""

from .params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
