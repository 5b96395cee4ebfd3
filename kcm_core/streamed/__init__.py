"""Models larger than memory, pruned one transformer layer at a time.

``skeleton``: the mechanism (a checkpoint read tensor by tensor, a model skeleton on the ``meta`` device
filled one layer at a time, a one-layer view that the in-memory functions accept); ``passes``: the two
passes over the layers (scores; then scales, slicing and writing) with the selection between them.
"""
from .passes import StreamResult, check_streamable, prune_streamed, score_streamed

__all__ = ["StreamResult", "check_streamable", "prune_streamed", "score_streamed"]
