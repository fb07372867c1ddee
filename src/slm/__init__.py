"""slm: build, train, evaluate and serve small GPT-style language models from scratch."""

__version__ = "0.1.0"
