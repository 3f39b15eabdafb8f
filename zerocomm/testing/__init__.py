"""Outside the library's core: toy models (TinyGPT, GPT2Like, LlamaLike),
the demo, and the one process launcher the demo, the benchmarks and the
scale model share. Nothing in the core imports this package."""
