"""Analysis tools: complexity (params, FLOPs); attention maps and statistics live beside it."""
