"""Analysis tools: attention maps and query-independence statistics (GCNet Sec. 3.1), complexity."""

from gcnet.analysis.attention import BlockCapture, attention_blocks, attention_maps
from gcnet.analysis.report import analyze
from gcnet.analysis.statistics import QueryStatistics, block_statistics, mean_cosine_distance, mean_js_divergence

__all__ = [
    "BlockCapture",
    "QueryStatistics",
    "analyze",
    "attention_blocks",
    "attention_maps",
    "block_statistics",
    "mean_cosine_distance",
    "mean_js_divergence",
]
